"""MEND on tiny models: the editor's formula against a per-token loop, the gradient factors against
autograd's gradient of W_out, the running statistics against torch's, one training step lowering the
loss, and an interrupted training resumed to the uninterrupted result."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from training_records import assert_training_resumes_exactly, records

from ece.config import Params, load_params
from ece.editing.editor_io import TrainingCheckpoint
from ece.editing.mend import (
    MendEditor,
    MendNet,
    edit_losses,
    encode_record,
    gradient_factors,
    labelled,
    target_nll,
    train,
)
from ece.model.adapter import ModelAdapter

ROOT = Path(__file__).resolve().parents[2]
LAYERS = [2, 3]  # of the 4-layer tiny models


def params(**train_editor: object) -> Params:
    overrides = [f"train_editor.{k}={v}" for k, v in train_editor.items()]
    return load_params(
        ROOT / "params.yaml", ["mend.layers=[2,3]", "mend.rank=8", "mend.accumulate=1", "mend.lr=1e-2", *overrides]
    )


def test_editor_formula_equals_a_per_token_loop() -> None:
    """ΔW = −α Σ_t δ̃_t ũ_tᵀ with [ũ; δ̃] = g(normalised [u; δ]), g two residual layers
    x + relu(s ⊙ (U V x + b) + o), written out token by token with plain vector operations."""
    torch.manual_seed(1)
    f, d, n = 6, 4, 5
    editor = MendEditor([0, 1], f, d, rank=3, edit_lr=0.3)
    with torch.no_grad():  # leave the identity start, so every term of the formula matters
        for name, t in editor.net.named_parameters():
            t.copy_(torch.randn_like(t) * (0.5 if name in ("U", "V") else 1.0))
        editor.alpha.copy_(torch.tensor([0.3, -0.7]))
    u, delta = torch.randn(2, n, f), torch.randn(2, n, d)
    u[1, 2] = 0  # a token without input: carries no edit
    editor.net.observe(torch.randn(50, f + d) * 3 + 1)
    with torch.no_grad():
        got = editor.weight_deltas({0: (u[0], delta[0]), 1: (u[1], delta[1])}, observe=False)

    net = editor.net
    mean, std = net.mean, (net.m2 / (net.count - 1)).sqrt()
    for mode in (0, 1):
        expected = torch.zeros(d, f, dtype=torch.float64)
        for t in range(n):
            if not (u[mode, t].any() and delta[mode, t].any()):
                continue
            x = (torch.cat([u[mode, t], delta[mode, t]]).double() - mean) / (std + 1e-7)
            for i in range(2):
                U, V, b = net.U[i].double(), net.V[i].double(), net.b[i].double()
                s, o = net.scale[i, mode].double(), net.shift[i, mode].double()
                pre = s * (U @ (V @ x) + b) + o
                x = x + torch.where(pre > 0, pre, torch.zeros_like(pre))
            expected -= float(editor.alpha[mode].detach()) * torch.outer(x[f:], x[:f])
        torch.testing.assert_close(got[mode].double(), expected, rtol=1e-4, atol=1e-5)


def test_running_statistics_equal_the_batch_statistics() -> None:
    torch.manual_seed(0)
    rows = torch.randn(37, 5) * torch.tensor([1.0, 2.0, 3.0, 0.5, 10.0]) + 4
    net = MendNet(3, 2, 1, 2)
    for chunk in rows.split([1, 9, 20, 7]):
        net.observe(chunk)
    assert int(net.count) == 37
    torch.testing.assert_close(net.mean.float(), rows.mean(0))
    torch.testing.assert_close((net.m2 / (net.count - 1)).float(), rows.var(0))


@pytest.mark.parametrize("kind", ["tiny_llama", "tiny_gpt2"])
def test_gradient_factors_give_the_gradient_of_w_out(kind: str, request: pytest.FixtureRequest) -> None:
    """Σ_t δ_t u_tᵀ from the hooked layers equals autograd's gradient of the summed target NLL with
    respect to each W_out (GPT-2's Conv1D stored transposed included)."""
    model, tok = request.getfixturevalue(kind)
    adapter = ModelAdapter(model)
    x = labelled(adapter, tok, LAYERS[0] - 1, ["Anna Berg works in", "Tom Hale plays the"], ["Oslo", "piano"])
    factors = gradient_factors(adapter, LAYERS, x)
    weights = [adapter.w_out_module(l).weight for l in LAYERS]
    for w in weights:
        w.requires_grad_(True)
    try:
        grads = torch.autograd.grad(target_nll(adapter, LAYERS[0] - 1, x).sum(), weights)
    finally:
        for w in weights:
            w.requires_grad_(False)
    for l, g in zip(LAYERS, grads):
        u, delta = factors[l]
        outer = torch.einsum("btd,btf->df", delta, u)
        torch.testing.assert_close(outer, g.T if adapter.spec.conv1d else g, rtol=1e-4, atol=1e-6)


def test_one_training_step_lowers_the_loss(tiny_llama, tmp_path: Path) -> None:
    """After one step on a record, MEND's loss on that record (with the statistics the step gathered) is
    lower than with the editor's initial weights."""
    model, tok = tiny_llama
    adapter = ModelAdapter(model)
    p = params(max_steps=1, eval_every=1, heldout=1, patience=0)
    rec = records()
    trained = train(adapter, tok, p, rec[:1], rec[1:2], TrainingCheckpoint(tmp_path / "ck"), log=lambda _: None)
    after = MendEditor.from_tensors(trained.tensors, trained.config)
    torch.manual_seed(p.train_editor.seed)  # the initial weights, as train makes them
    initial = MendEditor(LAYERS, adapter.inner_size, adapter.hidden_size, p.mend.rank, p.mend.edit_lr).state_dict()
    stats = ("net.count", "net.mean", "net.m2")
    before = MendEditor.from_tensors(
        {k: trained.tensors[k] if k in stats else v for k, v in initial.items()}, trained.config
    )
    assert not torch.equal(before.alpha, after.alpha)
    encoded = encode_record(adapter, tok, LAYERS[0] - 1, rec[0])

    def loss(editor: MendEditor) -> float:
        with torch.no_grad():
            l_edit, l_loc = edit_losses(editor, adapter, encoded, observe=False)
        return float(p.mend.c_edit * l_edit + p.mend.c_loc * l_loc)

    assert loss(after) < loss(before)


def test_interrupted_training_resumes_to_the_uninterrupted_result(tiny_llama, tmp_path: Path) -> None:
    model, tok = tiny_llama
    p = params(max_steps=6, eval_every=2, heldout=2, patience=0)
    assert_training_resumes_exactly(train, ModelAdapter(model), tok, p, tmp_path)
