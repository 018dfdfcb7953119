"""The least-squares updates and sequential batch editing of every method, on a tiny Llama."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from ece.config import AlphaEditCfg, EditCfg, FtCfg, Params, RomeCfg, UpdateCfg
from ece.editing.covariance import second_moments
from ece.editing.editor import Editor
from ece.editing.finetune import finetune_labels
from ece.editing.keys import keys_and_hidden
from ece.editing.solve import nullspace_basis, projected_update, restricted_update
from ece.editing.zvec import target_ids
from ece.errors import EceError
from ece.methods import Method, method_of
from ece.model.adapter import ModelAdapter

F_DIM, D_DIM = 12, 5


def _random(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(n, F_DIM, generator=g)
    residuals = torch.randn(n, D_DIM, generator=g)
    a = torch.randn(F_DIM, 3 * F_DIM, generator=g, dtype=torch.float64)
    penalty = a @ a.T / (3 * F_DIM)  # PSD, full rank
    return keys, residuals, penalty


def _closed_form(keys, residuals, penalty, cols):
    k = keys.double()[:, cols]
    c = penalty.double()[cols][:, cols]
    return residuals.double().T @ k @ torch.linalg.inv(c + k.T @ k)


# --- restricted_update -------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 3, 8])
@pytest.mark.parametrize("cols", [[0, 3, 7], [11, 2], list(range(F_DIM)), [5]])
def test_restricted_update_closed_form(n, cols):
    keys, residuals, penalty = _random(n, seed=n)
    cols_t = torch.tensor(cols)
    delta = restricted_update(keys, residuals, penalty, cols_t)
    assert delta.dtype == torch.float64
    assert delta.shape == (D_DIM, len(cols))
    expected = _closed_form(keys, residuals, penalty, cols_t)
    assert torch.allclose(delta, expected, rtol=1e-9, atol=1e-10)


def test_restricted_update_is_the_minimiser():
    keys, residuals, penalty = _random(4, seed=3)
    cols = torch.tensor([1, 4, 6, 9, 10])
    delta = restricted_update(keys, residuals, penalty, cols)
    k, c, r = keys.double()[:, cols].T, penalty[cols][:, cols], residuals.double().T

    def objective(x):
        return ((x @ k - r) ** 2).sum() + torch.trace(x @ c @ x.T)

    best = objective(delta)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        assert objective(delta + 1e-3 * torch.randn(delta.shape, generator=g, dtype=torch.float64)) > best


def test_restricted_update_none_is_memit_full_solve():
    keys, residuals, penalty = _random(5, seed=1)
    full = restricted_update(keys, residuals, penalty, None)
    assert full.shape == (D_DIM, F_DIM)
    k, r = keys.double().T, residuals.double().T  # f × n, d × n
    memit = r @ k.T @ torch.linalg.inv(penalty + k @ k.T)  # MEMIT: R Kᵀ (C + K Kᵀ)⁻¹
    assert torch.allclose(full, memit, rtol=1e-9, atol=1e-10)
    assert torch.allclose(full, restricted_update(keys, residuals, penalty, torch.arange(F_DIM)), atol=1e-12)


def test_restricted_update_interpolates_without_penalty():
    keys, residuals, _ = _random(3, seed=2)
    cols = torch.tensor([0, 2, 4, 6, 8])
    delta = restricted_update(keys, residuals, torch.eye(F_DIM, dtype=torch.float64) * 1e-9, cols)
    assert torch.allclose(delta @ keys.double()[:, cols].T, residuals.double().T, atol=1e-5)


def test_restricted_update_no_columns():
    keys, residuals, penalty = _random(2)
    delta = restricted_update(keys, residuals, penalty, torch.tensor([], dtype=torch.long))
    assert delta.shape == (D_DIM, 0)


@pytest.mark.parametrize("n", [1, 2, 4])
def test_restricted_update_not_positive_definite(n):
    keys, residuals, _ = _random(n)
    cols = torch.arange(6)  # more columns than keys and no penalty: K_Sᵀ K_S is singular
    with pytest.raises(EceError, match="not positive definite") as err:
        restricted_update(keys, residuals, torch.zeros(F_DIM, F_DIM, dtype=torch.float64), cols)
    assert "mom2_update_weight" in err.value.hint


def test_restricted_update_zero_key_column_is_not_pd():
    keys, residuals, _ = _random(8)
    keys[:, 3] = 0  # a dead neuron: its row/column of the system is exactly zero
    with pytest.raises(EceError):
        restricted_update(keys, residuals, torch.zeros(F_DIM, F_DIM), torch.tensor([1, 3, 5]))


# --- Editor.apply_batch ------------------------------------------------------------------------

LAYERS = [1, 2]
TEMPLATES = ["{}", "Once upon a time. {}"]
CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "Paris is the capital of France, and Rome is the capital of Italy. " * 3,
    "Knowledge editing rewrites facts stored in the weights of a model. " * 3,
]


@pytest.fixture
def editing(tiny_llama, facts):
    model, tok = tiny_llama
    adapter = ModelAdapter(model)
    c0, _ = second_moments(adapter, tok, LAYERS, CORPUS, 400, seq_len=32, batch_size=4, progress=False)
    _, h = keys_and_hidden(adapter, tok, facts, TEMPLATES, LAYERS, LAYERS[-1])
    g = torch.Generator().manual_seed(0)
    z = h + 0.5 * h.norm(dim=1, keepdim=True) * torch.randn(h.shape, generator=g) / h.shape[1] ** 0.5
    return model, tok, adapter, facts, c0, z


def method(name: str = "ece", weight: float = 1.0, use_cache: bool | None = None, **sections) -> Method:
    """The Method params.yaml would give on the tiny model (single-layer methods edit layer 2)."""
    p = Params(
        method=name,
        edit=EditCfg(layers=LAYERS),
        update=UpdateCfg(mom2_update_weight=weight),
        rome=sections.pop("rome", RomeCfg(layer=2)),
        ft=sections.pop("ft", FtCfg(layer=2)),
        **sections,
    )
    m = method_of(p)
    return m if use_cache is None else replace(m, use_cache=use_cache)


def _editor(adapter, tok, c0, use_cache, weight=1.0, templates=TEMPLATES):
    return Editor(adapter, tok, method("ece", weight, use_cache), templates, c0)


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_apply_batch_changes_only_the_given_columns(editing):
    model, tok, adapter, facts, c0, z = editing
    cols = {1: torch.tensor([3, 7, 10, 40]), 2: torch.tensor([0, 5, 63])}
    before = _snapshot(model)
    changes = _editor(adapter, tok, c0, use_cache=False).apply_batch(facts, z, cols)
    after = model.state_dict()
    edited = {adapter.w_out_name(l): l for l in LAYERS}
    for name, old in before.items():
        new = after[name]
        if name not in edited:
            assert torch.equal(old, new), f"{name} changed"
            continue
        l = edited[name]
        changed_cols = (old != new).any(dim=0).nonzero().squeeze(1)
        assert changed_cols.tolist() == cols[l].tolist(), name  # exactly those columns, all of them
    for l in LAYERS:
        ch = changes[l]
        assert torch.equal(ch.cols, cols[l])
        assert torch.equal(ch.old, before[adapter.w_out_name(l)][:, cols[l]])
        assert torch.equal(ch.new, after[adapter.w_out_name(l)][:, cols[l]])


def test_apply_batch_reaches_z_when_unregularised(editing):
    """One template, a negligible penalty and |S| ≥ n: the last layer's solve is exact, so the
    edited model's hidden state at the subject equals z."""
    model, tok, adapter, facts, c0, z = editing
    cols = {1: torch.arange(0, 64, 2), 2: torch.arange(1, 64, 3)}
    editor = _editor(adapter, tok, c0, use_cache=False, weight=1e-8, templates=["{}"])
    editor.apply_batch(facts, z, cols)
    _, h_after = keys_and_hidden(adapter, tok, facts, ["{}"], [LAYERS[-1]], LAYERS[-1])
    assert torch.allclose(h_after, z, atol=1e-4)


def test_apply_batch_first_layer_update_matches_restricted_update(editing):
    model, tok, adapter, facts, c0, z = editing
    cols = {1: torch.tensor([2, 9, 17, 33, 50]), 2: torch.tensor([4, 8])}
    keys, h = keys_and_hidden(adapter, tok, facts, TEMPLATES, [1], LAYERS[-1])
    expected = restricted_update(keys[1], (z - h) / len(LAYERS), 7.0 * c0[1], cols[1])
    changes = _editor(adapter, tok, c0, use_cache=False, weight=7.0).apply_batch(facts, z, cols)
    assert torch.allclose((changes[1].new - changes[1].old).double(), expected, atol=1e-6)


def test_cache_grows_by_post_edit_keys(editing):
    model, tok, adapter, facts, c0, z = editing
    editor = _editor(adapter, tok, c0, use_cache=True)
    assert all(torch.equal(editor.cache[l], torch.zeros(64, 64, dtype=torch.float64)) for l in LAYERS)
    cols = {1: torch.arange(20), 2: torch.arange(10, 40)}
    pre_keys, _ = keys_and_hidden(adapter, tok, facts[:2], TEMPLATES, LAYERS)
    editor.apply_batch(facts[:2], z[:2], cols)
    post_keys, _ = keys_and_hidden(adapter, tok, facts[:2], TEMPLATES, LAYERS)
    for l in LAYERS:
        k = post_keys[l].double()
        assert editor.cache[l].dtype == torch.float64
        assert torch.allclose(editor.cache[l], k.T @ k, atol=1e-10)
    # layer 2's keys are read after layer 1 was edited: pre-edit keys would be wrong there
    assert not torch.allclose(pre_keys[2], post_keys[2], atol=1e-6)

    # batch 2: its first-layer solve includes P, and P grows again by batch 2's post-edit keys
    p1 = {l: editor.cache[l].clone() for l in LAYERS}
    keys, h = keys_and_hidden(adapter, tok, facts[2:], TEMPLATES, [1], LAYERS[-1])
    expected = restricted_update(keys[1], (z[2:] - h) / len(LAYERS), c0[1] + p1[1], cols[1])
    changes = editor.apply_batch(facts[2:], z[2:], cols)
    assert torch.allclose((changes[1].new - changes[1].old).double(), expected, atol=1e-6)
    post2, _ = keys_and_hidden(adapter, tok, facts[2:], TEMPLATES, LAYERS)
    for l in LAYERS:
        k = post2[l].double()
        assert torch.allclose(editor.cache[l], p1[l] + k.T @ k, atol=1e-10)


def test_no_cache_for_memit(editing):
    model, tok, adapter, facts, c0, z = editing
    editor = _editor(adapter, tok, c0, use_cache=False)
    editor.apply_batch(facts, z, None)
    assert all(not editor.cache[l].any() for l in LAYERS)


def test_apply_batch_all_columns_when_cols_is_none(editing):
    model, tok, adapter, facts, c0, z = editing
    before = _snapshot(model)
    changes = _editor(adapter, tok, c0, use_cache=False).apply_batch(facts, z, None)
    for l in LAYERS:
        assert torch.equal(changes[l].cols, torch.arange(64))
        assert (before[adapter.w_out_name(l)] != model.state_dict()[adapter.w_out_name(l)]).any(dim=0).all()


def test_apply_batch_not_pd_raises(editing):
    model, tok, adapter, facts, c0, z = editing
    before = _snapshot(model)
    editor = _editor(adapter, tok, c0, use_cache=True, weight=0.0)  # no penalty at all
    cols = {1: torch.arange(10), 2: torch.arange(10)}  # 10 columns, 4 keys
    with pytest.raises(EceError, match="not positive definite"):
        editor.apply_batch(facts, z, cols)
    # it fails in the first layer, before any write
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_nan_in_z_raises_before_any_write(editing):
    """A NaN in z poisons the residual of the FIRST edited layer, so apply_batch raises there:
    no layer has been written in memory and the cache is untouched."""
    model, tok, adapter, facts, c0, z = editing
    before = _snapshot(model)
    z = z.clone()
    z[1, 4] = float("nan")
    editor = _editor(adapter, tok, c0, use_cache=True)
    with pytest.raises(EceError, match="layer 1: the update is not finite"):
        editor.apply_batch(facts, z, {1: torch.arange(8), 2: torch.arange(8)})
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert all(not editor.cache[l].any() for l in LAYERS)


def test_failure_in_a_later_layer_reverts_earlier_layers(editing):
    """apply_batch is atomic: when layer 2's solve fails (here: NaN statistics for layer 2), the
    columns layer 1 already received are put back, and the error names the layer."""
    model, tok, adapter, facts, c0, z = editing
    before = _snapshot(model)
    c0 = {l: m.clone() for l, m in c0.items()}
    c0[2][0, 0] = float("nan")
    editor = _editor(adapter, tok, c0, use_cache=True)
    with pytest.raises(EceError, match="layer 2: .*not positive definite"):
        editor.apply_batch(facts, z, None)
    after = model.state_dict()
    assert torch.equal(before[adapter.w_out_name(1)], after[adapter.w_out_name(1)])
    assert torch.equal(before[adapter.w_out_name(2)], after[adapter.w_out_name(2)])
    assert all(not editor.cache[l].any() for l in LAYERS)


def test_exploding_update_raises(editing):
    model, tok, adapter, facts, c0, z = editing
    editor = Editor(adapter, tok, method("memit"), TEMPLATES, c0, max_update_norm=1e-6)
    with pytest.raises(EceError, match="explodes"):
        editor.apply_batch(facts, z, None)


# --- the baselines: each changes only what it should --------------------------------------------


def _changed_params(before: dict[str, torch.Tensor], model) -> list[str]:
    return [k for k, v in model.state_dict().items() if not torch.equal(before[k], v)]


def test_projected_update_equals_alphaedits_formula():
    """Δ = B Uᵀ from the Cholesky solve in null-space coordinates equals AlphaEdit's
    (P(K_p K_pᵀ + K Kᵀ) + l2·I)⁻¹ P K Rᵀ (transposed), and lies in the null space."""
    keys, residuals, c0 = _random(6)
    c0 = c0.clone()
    values, vectors = torch.linalg.eigh(c0)
    c0 = vectors @ torch.diag(torch.where(torch.arange(F_DIM) < 4, 1e-6, values)) @ vectors.T  # 4 near-null directions
    basis = nullspace_basis(c0, 1e-3)
    assert basis.shape == (F_DIM, 4)
    kp = torch.randn(3, F_DIM, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    cache, l2 = kp.T @ kp, 10.0
    delta = projected_update(keys, residuals, cache + l2 * torch.eye(F_DIM, dtype=torch.float64), basis)
    proj = basis @ basis.T
    k = keys.double().T
    reference = torch.linalg.solve(
        proj @ (cache + k @ k.T) + l2 * torch.eye(F_DIM, dtype=torch.float64), proj @ k @ residuals.double()
    ).T
    assert torch.allclose(delta, reference, atol=1e-10)
    assert torch.allclose(
        delta @ (torch.eye(F_DIM, dtype=torch.float64) - proj),
        torch.zeros(D_DIM, F_DIM, dtype=torch.float64),
        atol=1e-10,
    )


def test_nullspace_basis_by_energy_share_of_a_hand_made_spectrum():
    """Eigenvalues 0.001, 0.002, 0.007, 0.09, 0.9 (sum 1.0): a share of 0.01 keeps the three smallest
    (0.010 <= 0.01), 0.0099 only two; the absolute threshold ignores the share."""
    q, _ = torch.linalg.qr(torch.randn(5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(3)))
    values = torch.tensor([0.001, 0.002, 0.007, 0.09, 0.9], dtype=torch.float64)
    c0 = q @ torch.diag(values) @ q.T
    for energy, n in ((0.0101, 3), (0.0099, 2)):
        basis = nullspace_basis(c0, 1e-9, energy)
        assert basis.shape == (5, n)
        expected = q[:, :n]  # the n smallest eigen-directions
        assert torch.allclose(basis @ basis.T, expected @ expected.T, atol=1e-10)
    assert nullspace_basis(c0, 0.05).shape == (5, 3)
    with pytest.raises(EceError, match="nullspace_energy"):
        nullspace_basis(c0, 0.05, 0.0005)


def test_nullspace_basis_empty_is_a_clear_error():
    _, _, c0 = _random(4)
    with pytest.raises(EceError, match="null space is empty"):
        nullspace_basis(c0 + torch.eye(F_DIM, dtype=torch.float64), 1e-3)


def test_alphaedit_update_lies_in_the_null_space_and_caches_keys(editing):
    model, tok, adapter, facts, c0, z = editing
    threshold = float(torch.linalg.eigvalsh(c0[1])[40])  # keep the 40 smallest directions
    m = method("alphaedit", alphaedit=AlphaEditCfg(nullspace_threshold=threshold, l2=1.0))
    editor = Editor(adapter, tok, m, TEMPLATES, {l: c0[l] for l in LAYERS})
    before = _snapshot(model)
    changes = editor.apply_batch(facts, z, None)
    assert sorted(_changed_params(before, model)) == sorted(adapter.w_out_name(l) for l in LAYERS)
    for l in LAYERS:
        basis = editor.nullspace[l]
        delta = (changes[l].new - changes[l].old).double()
        assert delta.norm() > 0
        outside = delta - delta @ basis @ basis.T  # float32 weights: new - old carries ~1e-5 relative rounding
        assert outside.norm() < 1e-3 * delta.norm()  # a random Δ would have ~60% of its norm outside
        # what ordinary text excites most (the top eigenvector of C0) does not move
        top = torch.linalg.eigh(c0[l].double())[1][:, -1]
        assert (delta @ top).norm() < 1e-3 * delta.norm()
        assert editor.cache[l].any()  # P grows, as in ECE


def test_rome_writes_one_rank_one_update_per_fact_on_one_layer(editing):
    model, tok, adapter, facts, c0, z = editing
    before = _snapshot(model)
    _, h2 = keys_and_hidden(adapter, tok, facts, ["{}"], [2], 2)
    z2 = h2 + (z - z.mean(0))  # a target at ROME's own layer
    editor = Editor(adapter, tok, method("rome", rome=RomeCfg(layer=2, mom2_update_weight=1e-6)), ["{}"], c0)
    changes = editor.apply_batch(facts[:1], z2[:1], None)
    assert _changed_params(before, model) == [adapter.w_out_name(2)]
    delta = (changes[2].new - changes[2].old).double()
    assert torch.linalg.matrix_rank(delta, rtol=1e-6) == 1
    # λ → 0: ROME's equality constraint holds, the subject's hidden state is z
    _, after = keys_and_hidden(adapter, tok, facts[:1], ["{}"], [2], 2)
    assert torch.allclose(after, z2[:1], atol=1e-3)
    # a batch of facts: one rank-one update each, applied in order, so the total has rank ≤ n
    more = editor.apply_batch(facts[1:], z2[1:], None)
    total = (more[2].new - more[2].old).double()
    assert torch.linalg.matrix_rank(total, rtol=1e-6) == len(facts) - 1
    assert not editor.cache[2].any()  # ROME keeps no cache


@pytest.mark.parametrize("name", ["ft-l", "ft-m"])
def test_finetuning_changes_one_layer_within_the_linf_ball_and_learns(editing, name):
    model, tok, adapter, facts, c0, _ = editing
    ft = FtCfg(layer=2, lr=1e-2, steps=10, norm_constraint=2e-2)
    m = method(name, ft=ft)
    ids, mask, labels = finetune_labels(tok, facts, m.target_only)
    n_target = sum(len(target_ids(tok, f.target_new)) for f in facts)
    assert int((labels >= 0).sum()) == (n_target if name == "ft-m" else int(mask.sum()) - len(facts))

    def loss() -> float:
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits
        return float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100))

    before, start = _snapshot(model), loss()
    changes = Editor(adapter, tok, m, TEMPLATES, c0).apply_batch(facts, None, None)
    assert _changed_params(before, model) == [adapter.w_out_name(2)]
    delta = changes[2].new - changes[2].old
    assert delta.abs().max() <= ft.norm_constraint + 1e-6
    assert delta.abs().max() > ft.norm_constraint / 2  # the constraint is active, not vacuous
    assert loss() < start


def test_method_table():
    assert method("ece").selects_columns and method("ece").clusters and method("ece").use_cache
    memit = method("memit")
    assert not memit.selects_columns and not memit.use_cache and memit.layers == tuple(LAYERS)
    assert method("rome").layers == (2,) and method("rome").per_fact
    assert method("alphaedit").use_cache and method("alphaedit").mom2_weight == 0.0
    assert not method("ft-l").needs_z and method("ft-m").target_only and not method("ft-l").target_only
