"""UltraEdit on the tiny models, against a plain re-computation of the reference's formulas.

The reference (XiaojieGu/UltraEdit, editor/ultraedit.py and nets.RunningMeanStd) is re-computed here
on its own path: one forward/backward per fact with the W_out weights made trainable and a full
backward hook (as the reference collects its features), the running moments by the reference's update
written as a loop over chunks, or in closed form, the pseudo values row by row, and the ridge solve by
torch.linalg.solve(KᵀK + I, KᵀV), the reference's own call. None of it goes through ece.editing.ultraedit.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ece.config import EditCfg, Params, UltraEditCfg
from ece.editing.editor import Editor
from ece.editing.ultraedit import Moments, update_moments
from ece.editing.zvec import target_ids
from ece.methods import method_of
from ece.model.adapter import ModelAdapter
from ece.model.prompts import document_start

LAYERS = [1, 2]
LR = 1e-3  # the reference's 1e-6 gives updates near float32 rounding on a model this small
EPS = torch.finfo(torch.float32).eps


def editor_for(model, tok) -> Editor:
    p = Params(method="ultraedit", edit=EditCfg(layers=LAYERS), ultraedit=UltraEditCfg(layers=LAYERS, lr=LR))
    return Editor(ModelAdapter(model), tok, method_of(p), ["{}"], {})


def reference_features(model, tok, facts) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Per layer: keys and output gradients at every target-predicting position, fact after fact, of
    the batch's mean target NLL (each fact's summed NLL over the batch's target-token count)."""
    adapter = ModelAdapter(model)
    modules = {l: adapter.w_out_module(l) for l in LAYERS}
    texts = [f.prompt.replace("{}", f.subject) for f in facts]
    targets = [target_ids(tok, f.target_new) for f in facts]
    n_tokens = sum(len(t) for t in targets)
    keys: dict[int, list[torch.Tensor]] = {l: [] for l in LAYERS}
    grads: dict[int, list[torch.Tensor]] = {l: [] for l in LAYERS}
    for text, target in zip(texts, targets):
        ids = torch.tensor([document_start(tok) + tok(text).input_ids + target])
        first = ids.shape[1] - len(target)  # position of the first target token
        rows = list(range(first - 1, ids.shape[1] - 1))  # the positions whose logits predict the target
        seen: dict[tuple[str, int], torch.Tensor] = {}
        handles = []
        for l, m in modules.items():
            m.weight.requires_grad_(True)
            handles.append(
                m.register_forward_hook(lambda _m, i, _o, l=l, seen=seen: seen.__setitem__(("k", l), i[0].detach()))
            )
            handles.append(
                m.register_full_backward_hook(lambda _m, _gi, go, l=l, seen=seen: seen.__setitem__(("g", l), go[0]))
            )
        try:
            logits = model(input_ids=ids).logits[0]
            loss = sum(F.cross_entropy(logits[r : r + 1], ids[0, r + 1 : r + 2], reduction="sum") for r in rows)
            (loss / n_tokens).backward()
        finally:
            for h in handles:
                h.remove()
            for m in modules.values():
                m.weight.requires_grad_(False)
                m.weight.grad = None
        for l in LAYERS:
            keys[l] += [seen[("k", l)][0, r] for r in rows]
            grads[l] += [seen[("g", l)][0, r] for r in rows]
    return {l: (torch.stack(keys[l]).double(), torch.stack(grads[l]).double()) for l in LAYERS}


class RunningMeanStd:
    """The reference's nets.RunningMeanStd.update, in float64, one chunk of rows at a time."""

    def __init__(self, size: int) -> None:
        self.n, self.mean, self.var = (
            0.0,
            torch.zeros(size, dtype=torch.float64),
            torch.zeros(size, dtype=torch.float64),
        )
        self.std = torch.zeros(size, dtype=torch.float64)

    def update(self, x: torch.Tensor) -> None:
        m = x.shape[0]
        n = self.n + m
        delta = x.mean(0) - self.mean
        self.mean = self.mean + m * delta / n
        self.var = self.var + m * x.var(0) + self.n * m * delta**2 / n
        self.std = (self.var / (n - 1 + EPS)).sqrt()
        self.n = n


def reference_deltas(features, norm: RunningMeanStd) -> dict[int, torch.Tensor]:
    """Δ (d × f) per layer: v_t = −lr ‖k̂_t‖² ĝ_t row by row, then solve(KᵀK + I, KᵀV)ᵀ."""
    out = {}
    for l, (k, g) in features.items():
        f = k.shape[1]
        values = []
        for t in range(k.shape[0]):
            x_hat = (torch.cat([k[t], g[t]]) - norm.mean) / (norm.std + EPS)
            k_hat, g_hat = x_hat[:f], x_hat[f:]
            values.append(-LR * float((k_hat * k_hat).sum()) * g_hat)
        v = torch.stack(values)
        out[l] = torch.linalg.solve(k.T @ k + torch.eye(f, dtype=torch.float64), k.T @ v).T
    return out


def applied(changes) -> dict[int, torch.Tensor]:
    return {l: (c.new - c.old).double() for l, c in changes.items()}


def assert_close_to_float32_writes(got: torch.Tensor, expected: torch.Tensor, weights: torch.Tensor) -> None:
    """Δ written into float32 weights carries at most an ulp of the weights' magnitude per entry."""
    assert expected.abs().max() > 100 * EPS * weights.abs().max(), "the update must be visible above rounding"
    assert torch.allclose(got, expected, rtol=1e-4, atol=2 * EPS * float(weights.abs().max()))


pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")


@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_gpt2"])
def test_one_batch_equals_the_reference_formulas(arch, facts, request) -> None:
    model, tok = request.getfixturevalue(arch)
    features = reference_features(model, tok, facts)
    norm = RunningMeanStd(ModelAdapter(model).inner_size + ModelAdapter(model).hidden_size)
    for l in LAYERS:  # one normaliser for every edited W_out (one shape), chunks in layer order
        norm.update(torch.cat(features[l], dim=1))
    expected = reference_deltas(features, norm)

    editor = editor_for(model, tok)
    changes = editor.apply_batch(facts, None, None)
    for l, delta in applied(changes).items():
        assert torch.equal(changes[l].cols, torch.arange(delta.shape[1]))  # every column of W_out
        assert_close_to_float32_writes(delta, expected[l], changes[l].new)
    assert editor.moments is not None and float(editor.moments.n) == sum(len(features[l][0]) for l in LAYERS)
    assert not any(c.any() for c in editor.cache.values()), "UltraEdit keeps no cache of keys"


def test_moments_after_two_batches_equal_the_closed_form(tiny_llama, facts) -> None:
    """After two batches the moments are those of the four chunks (two batches × two layers), whatever
    the order: mean = the mean of every row; the reference's accumulated var = Σ_c m_c/(m_c−1)·SS_c
    (each chunk's own spread as m·var_unbiased) + Σ_c m_c·(μ_c − μ)² (the between-chunk part of Chan's
    merge); std = √(var / (N − 1 + ε)). And batch 2's update uses them."""
    model, tok = tiny_llama
    editor = editor_for(model, tok)
    first = reference_features(model, tok, facts[:2])
    editor.apply_batch(facts[:2], None, None)
    second = reference_features(model, tok, facts[2:])  # on the weights batch 1 left
    changes = editor.apply_batch(facts[2:], None, None)

    chunks = [torch.cat(feats[l], dim=1) for feats in (first, second) for l in LAYERS]
    rows = torch.cat(chunks)
    mean = rows.mean(0)
    var = sum(len(c) / (len(c) - 1) * ((c - c.mean(0)) ** 2).sum(0) + len(c) * (c.mean(0) - mean) ** 2 for c in chunks)
    std = (var / (len(rows) - 1 + EPS)).sqrt()
    m = editor.moments
    assert m is not None and float(m.n) == len(rows)
    assert torch.allclose(m.mean, mean, rtol=1e-5, atol=1e-9)
    assert torch.allclose(m.var, var, rtol=1e-5, atol=1e-12)
    assert torch.allclose(m.std, std, rtol=1e-5, atol=1e-9)
    assert not torch.allclose(m.std**2, rows.var(0), rtol=1e-3), "the reference's var is not the plain variance"

    norm = RunningMeanStd(len(mean))
    for c in chunks:
        norm.update(c)
    expected = reference_deltas(second, norm)
    for l, delta in applied(changes).items():
        assert_close_to_float32_writes(delta, expected[l], changes[l].new)


def test_a_failed_batch_leaves_weights_and_moments_as_they_were(tiny_llama, facts) -> None:
    """A batch is written whole or not at all, and so are the moments it would carry."""
    model, tok = tiny_llama
    editor = editor_for(model, tok)
    editor.apply_batch(facts[:2], None, None)
    moments, before = editor.moments, {k: v.clone() for k, v in model.state_dict().items()}
    editor.max_update_norm = 1e-12  # every layer's update now "explodes"
    with pytest.raises(Exception, match="explodes"):
        editor.apply_batch(facts[2:], None, None)
    assert editor.moments is moments
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_one_row_has_no_spread_instead_of_nan() -> None:
    """A batch of one fact with a one-token target gives one row per layer: its own spread counts as
    zero (the reference's unbiased variance of one row would be NaN). Worked by hand: after [1, −2, 3],
    then the chunk [[3, 0, 3], [5, 2, 3]] (mean [4, 1, 3], 2·SS = [4, 4, 0]): overall mean [3, 0, 3],
    between-chunk part 1·[4, 4, 0] + 2·[1, 1, 0], so var = [10, 10, 0] and std = √(var / (3 − 1 + ε))."""
    d = dict(dtype=torch.float64)
    m = update_moments(Moments.empty(3), torch.tensor([[1.0, -2.0, 3.0]]))
    assert float(m.n) == 1 and torch.equal(m.mean, torch.tensor([1.0, -2.0, 3.0], **d)) and not m.var.any()
    m = update_moments(m, torch.tensor([[3.0, 0.0, 3.0], [5.0, 2.0, 3.0]]))
    assert float(m.n) == 3
    assert torch.allclose(m.mean, torch.tensor([3.0, 0.0, 3.0], **d), atol=1e-12)
    assert torch.allclose(m.var, torch.tensor([10.0, 10.0, 0.0], **d), atol=1e-12)
    assert torch.allclose(m.std, (torch.tensor([10.0, 10.0, 0.0], **d) / (2 + EPS)).sqrt(), atol=1e-12)
