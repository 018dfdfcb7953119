"""Target hidden states z: the loss, batching exactness, the two-step schedule, clamping and Adam."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ece.adapter import ModelAdapter
from ece.config import ZCfg
from ece.keys import Fact, document_start, keys_and_hidden
from ece.zvec import Adam, ZProblem, build_problem, clamp_rows, fact_losses, optimise, target_ids, two_step_z

LAYER = 2
TEMPLATES = ["{}", "Once upon a time. {}"]
ATOL = 1e-5


def cfg(shared: int = 2, instance: int = 2, **kw) -> ZCfg:
    return ZCfg(shared_steps=shared, instance_steps=instance, **kw)


@pytest.fixture(params=["tiny_llama", "tiny_gpt2"])
def setup(request, facts):
    model, tok = request.getfixturevalue(request.param)
    adapter = ModelAdapter(model)
    facts = facts[:3]
    problem = build_problem(adapter, tok, facts, LAYER, TEMPLATES)
    return model, tok, adapter, facts, problem


def zeros(problem: ZProblem) -> torch.Tensor:
    return torch.zeros(problem.n_facts, problem.h.shape[1])


def alone(problem: ZProblem, i: int) -> ZProblem:
    return problem.subset(torch.tensor([i]))


# --- the problem and the loss ------------------------------------------------------------------


def test_target_ids_have_a_leading_space(tiny_llama):
    _, tok = tiny_llama
    assert target_ids(tok, "Rome") == tok(" Rome", add_special_tokens=False).input_ids
    assert target_ids(tok, " Rome") == target_ids(tok, "Rome")


def _manual_nll(model, tok, adapter, fact, delta_row):
    """Mean over templates of the mean target NLL, from full forwards with δ added by a hook."""
    target = target_ids(tok, fact.target_new)
    nlls = []
    for t in TEMPLATES:
        prompt = t.replace("{}", fact.prompt)
        start = prompt.index("{}")
        before = prompt[:start] + fact.subject
        prefix = document_start(tok) + tok(before, add_special_tokens=False).input_ids
        pos = len(prefix) - 1  # byte tokenizer: the subject's last byte
        ids = document_start(tok) + tok(prompt.replace("{}", fact.subject), add_special_tokens=False).input_ids
        n_prompt = len(ids)
        ids = torch.tensor([ids + target])

        def hook(_m, _i, out, pos=pos):
            hs = out[0] if isinstance(out, tuple) else out
            hs = hs.clone()
            hs[0, pos] += delta_row
            return (hs, *out[1:]) if isinstance(out, tuple) else hs

        handle = adapter.blocks[LAYER].register_forward_hook(hook)
        try:
            with torch.no_grad():
                logp = F.log_softmax(model(input_ids=ids).logits[0], dim=-1)
        finally:
            handle.remove()
        tok_nll = [-logp[n_prompt - 1 + k, target[k]] for k in range(len(target))]
        nlls.append(torch.stack(tok_nll).mean())
    return torch.stack(nlls).mean()


def test_fact_losses_match_full_forward(setup):
    model, tok, adapter, facts, problem = setup
    c = cfg()
    at_zero = fact_losses(problem, adapter, LAYER, zeros(problem), c)
    assert at_zero.kl.abs().max() < 1e-5  # unedited: no divergence
    assert torch.allclose(at_zero.total, at_zero.nll + c.kl_factor * at_zero.kl, atol=1e-6)  # no decay at 0
    g = torch.Generator().manual_seed(1)
    delta = torch.randn(problem.n_facts, problem.h.shape[1], generator=g)
    moved = fact_losses(problem, adapter, LAYER, delta, c)
    assert (moved.kl > 0).all()  # near-uniform random models: small but positive
    decay = c.weight_decay * delta.norm(dim=1) / problem.h.norm(dim=1) ** 2
    assert torch.allclose(moved.total, moved.nll + c.kl_factor * moved.kl + decay, atol=1e-5)
    for i, fact in enumerate(facts):
        assert torch.allclose(at_zero.nll[i], _manual_nll(model, tok, adapter, fact, torch.zeros(32)), atol=ATOL)
        assert torch.allclose(moved.nll[i], _manual_nll(model, tok, adapter, fact, delta[i]), atol=ATOL)


def test_problem_h_and_kl_reference(setup):
    model, tok, adapter, facts, problem = setup
    _, h = keys_and_hidden(adapter, tok, facts, TEMPLATES, [LAYER], LAYER)
    assert torch.allclose(problem.h, h, atol=1e-6)  # the bare prompt (template "{}"), not an average
    for i, fact in enumerate(facts):
        ids = torch.tensor([document_start(tok) + tok(f"{fact.subject} is a", add_special_tokens=False).input_ids])
        with torch.no_grad():
            ref = F.log_softmax(model(input_ids=ids).logits[0, -1], dim=-1)
        assert torch.allclose(problem.kl_ref[i], ref, atol=1e-5)
        row = problem.kl_rows[i]
        assert int(problem.position_ids[row, problem.kl_last[i]]) == ids.shape[1] - 1  # counted from the subject
        assert (problem.labels[problem.kl_rows[i]] == -100).all()  # no NLL on the KL prompt


def test_problem_subset(setup):
    *_, adapter, _, problem = setup
    sub = problem.subset(torch.tensor([2, 0]))
    assert sub.n_facts == 2
    assert torch.equal(sub.h, problem.h[[2, 0]])
    assert torch.equal(sub.kl_ref, problem.kl_ref[[2, 0]])
    assert sorted(sub.row_fact.tolist()) == [0] * (len(TEMPLATES) + 1) + [1] * (len(TEMPLATES) + 1)
    # the KL rows still point at each fact's own KL prompt
    for j, i in enumerate([2, 0]):
        assert torch.equal(sub.hidden[sub.kl_rows[j]], problem.hidden[problem.kl_rows[i]])
        assert sub.row_fact[sub.kl_rows[j]] == j
    c = cfg()
    full = fact_losses(problem, adapter, LAYER, zeros(problem), c)
    part = fact_losses(sub, adapter, LAYER, zeros(sub), c)
    assert torch.allclose(part.total, full.total[[2, 0]], atol=ATOL)


# --- (1) batching is exact ---------------------------------------------------------------------


def test_batched_optimise_equals_per_fact(setup):
    *_, adapter, _, problem = setup
    c = cfg()
    batched, adam = optimise(problem, adapter, LAYER, zeros(problem), Adam.zeros(zeros(problem)), 3, c)
    assert adam.step == 3
    assert batched.abs().sum(1).gt(0).all()
    for i in range(problem.n_facts):
        p = alone(problem, i)
        single, single_adam = optimise(p, adapter, LAYER, zeros(p), Adam.zeros(zeros(p)), 3, c)
        assert torch.allclose(batched[i], single[0], atol=ATOL), i
        assert torch.allclose(adam.m[i], single_adam.m[0], atol=ATOL)


def test_batched_two_step_equals_per_fact_schedule(setup):
    *_, adapter, _, problem = setup
    c = cfg(2, 2)
    labels, anchors = torch.tensor([0, 0, 1]), torch.tensor([1, 2])
    res = two_step_z(problem, adapter, LAYER, labels, anchors, c)
    for i in range(problem.n_facts):
        a = int(anchors[labels[i]])
        pa = alone(problem, a)
        shared, adam = optimise(pa, adapter, LAYER, zeros(pa), Adam.zeros(zeros(pa)), c.shared_steps, c)
        pi = alone(problem, i)
        delta, _ = optimise(pi, adapter, LAYER, shared, adam, c.instance_steps, c)
        assert torch.allclose(res.delta[i], delta[0], atol=ATOL), i
    assert torch.allclose(res.z, res.h + res.delta)
    assert torch.equal(res.h, problem.h)


# --- (2) the two-step schedule -----------------------------------------------------------------


def test_shared_phase_runs_on_anchors_only(setup):
    *_, adapter, _, problem = setup
    labels, anchors = torch.tensor([0, 0, 1]), torch.tensor([1, 2])
    s = 3
    res = two_step_z(problem, adapter, LAYER, labels, anchors, cfg(s, 0))
    pa = problem.subset(anchors)
    shared, _ = optimise(pa, adapter, LAYER, zeros(pa), Adam.zeros(zeros(pa)), s, cfg(s, 0))
    # with no instance steps every member carries its anchor's δ
    assert torch.allclose(res.delta[0], shared[0], atol=ATOL)
    assert torch.allclose(res.delta[1], shared[0], atol=ATOL)
    assert torch.allclose(res.delta[2], shared[1], atol=ATOL)
    # fact 0 did not take part: its own optimisation would give something else
    p0 = alone(problem, 0)
    own, _ = optimise(p0, adapter, LAYER, zeros(p0), Adam.zeros(zeros(p0)), s, cfg(s, 0))
    assert not torch.allclose(own[0], res.delta[0], atol=1e-3)
    # the returned losses are those of the returned δ
    losses = fact_losses(problem, adapter, LAYER, res.delta, cfg(s, 0))
    assert torch.allclose(losses.total, res.losses.total, atol=1e-6)


def test_members_start_from_anchor_delta_and_adam_state(setup):
    *_, adapter, _, problem = setup
    s, t = 2, 2
    c = cfg(s, t)
    labels, anchors = torch.tensor([0, 0, 1]), torch.tensor([1, 2])
    res = two_step_z(problem, adapter, LAYER, labels, anchors, c)
    # an anchor continues uninterrupted: plain s + t steps on itself
    for a in (1, 2):
        pa = alone(problem, a)
        plain, _ = optimise(pa, adapter, LAYER, zeros(pa), Adam.zeros(zeros(pa)), s + t, c)
        assert torch.allclose(res.delta[a], plain[0], atol=ATOL)
    # a member: t steps from the anchor's δ and Adam moments (bias correction continues at step s)
    p1 = alone(problem, 1)
    shared, adam = optimise(p1, adapter, LAYER, zeros(p1), Adam.zeros(zeros(p1)), s, c)
    p0 = alone(problem, 0)
    expect, _ = optimise(p0, adapter, LAYER, shared, adam, t, c)
    assert torch.allclose(res.delta[0], expect[0], atol=ATOL)
    fresh, _ = optimise(p0, adapter, LAYER, shared, Adam.zeros(shared), t, c)
    assert not torch.allclose(res.delta[0], fresh[0], atol=1e-4)  # the Adam state does matter


@pytest.mark.parametrize(("s", "t"), [(2, 2), (0, 3), (3, 0)])
def test_singleton_clusters_are_plain_memit(setup, s, t):
    *_, adapter, _, problem = setup
    n = problem.n_facts
    res = two_step_z(problem, adapter, LAYER, torch.arange(n), torch.arange(n), cfg(s, t))
    plain, _ = optimise(problem, adapter, LAYER, zeros(problem), Adam.zeros(zeros(problem)), s + t, cfg(s, t))
    assert torch.allclose(res.delta, plain, atol=ATOL)


# --- (3) optimisation works --------------------------------------------------------------------


@pytest.mark.parametrize("kind_fixture", ["tiny_llama", "tiny_gpt2"])
def test_optimisation_lowers_target_nll(request, kind_fixture):
    model, tok = request.getfixturevalue(kind_fixture)
    adapter = ModelAdapter(model)
    # Subjects at the end of the prompt, so the edited position itself predicts the first target
    # token: random tiny models attend diffusely and barely react to δ anywhere else.
    facts = [
        Fact("a", "Paris", "The capital city {}", "Rome"),
        Fact("b", "Danielle Darrieux", "{}", "English"),
        Fact("c", "Toko Yasuda", "{}", "piano"),
    ]
    problem = build_problem(adapter, tok, facts, LAYER, TEMPLATES)
    # No weight decay: MEMIT's decay term divides by ‖h‖², which is tiny in a random model (≈0.02),
    # so with the default 0.5 it dominates the loss.
    c = cfg(2, 2, weight_decay=0.0)
    before = fact_losses(problem, adapter, LAYER, zeros(problem), c)
    res = two_step_z(problem, adapter, LAYER, torch.tensor([0, 0, 1]), torch.tensor([0, 2]), c)
    assert (res.losses.nll < before.nll - 0.02).all(), (before.nll, res.losses.nll)
    assert (res.losses.total < before.total).all()
    # a random δ of the same norms does not help
    g = torch.Generator().manual_seed(0)
    rand = torch.randn(res.delta.shape, generator=g)
    rand = rand / rand.norm(dim=1, keepdim=True) * res.delta.norm(dim=1, keepdim=True)
    assert (fact_losses(problem, adapter, LAYER, rand, c).nll > res.losses.nll).all()


# --- (4) clamping ------------------------------------------------------------------------------


def test_clamp_rows_never_exceeds_the_limit():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(50, 16, generator=g) * torch.rand(50, 1, generator=g) * 10
    delta = torch.randn(50, 16, generator=g) * torch.rand(50, 1, generator=g) * 100
    delta[0] = 0
    for factor in (0.0, 0.1, 1.0, 4.0, 1e3):
        out = clamp_rows(delta, h, factor)
        limit = factor * h.norm(dim=1)
        assert (out.norm(dim=1) <= limit * (1 + 1e-6) + 1e-12).all()
        inside = delta.norm(dim=1) <= limit
        assert torch.equal(out[inside], delta[inside])  # rows within the ball are untouched
        outside = ~inside & (delta.norm(dim=1) > 0)
        if outside.any():
            # projected, not reshaped: same direction, norm exactly at the limit
            cos = F.cosine_similarity(out[outside], delta[outside], dim=1)
            if factor > 0:
                assert torch.allclose(cos, torch.ones_like(cos), atol=1e-5)
            assert torch.allclose(out[outside].norm(dim=1), limit[outside], rtol=1e-5, atol=1e-6)
        assert out.isfinite().all()


def test_optimise_respects_the_clamp(setup):
    *_, adapter, _, problem = setup
    c = cfg(0, 3, clamp_norm_factor=0.05, lr=5.0)
    delta, _ = optimise(problem, adapter, LAYER, zeros(problem), Adam.zeros(zeros(problem)), 3, c)
    limit = 0.05 * problem.h.norm(dim=1)
    assert (delta.norm(dim=1) <= limit * (1 + 1e-5)).all()
    assert (delta.norm(dim=1) >= limit * (1 - 1e-5)).all()  # lr 5 reaches the boundary


# --- (5) Adam ----------------------------------------------------------------------------------


@pytest.mark.parametrize("lr", [0.5, 0.01])
def test_adam_matches_torch(lr):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4, 4, generator=g)
    b = torch.randn(3, 4, generator=g)
    x0 = torch.randn(3, 4, generator=g)

    def loss(x):
        return ((x @ a - b) ** 2).sum() + 0.1 * (x**4).sum()

    ref = x0.clone().requires_grad_(True)
    opt = torch.optim.Adam([ref], lr=lr, betas=(0.9, 0.999), eps=1e-8)
    mine, state = x0.clone(), Adam.zeros(x0)
    for _ in range(6):
        opt.zero_grad()
        loss(ref).backward()
        opt.step()
        p = mine.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(loss(p), p)
        mine = state.update(mine, grad, lr)
        assert torch.allclose(mine, ref.detach(), atol=1e-6, rtol=1e-5)
    assert state.step == 6
    st = opt.state[ref]
    assert torch.allclose(state.m, st["exp_avg"], atol=1e-6)
    assert torch.allclose(state.v, st["exp_avg_sq"], atol=1e-6)


def test_adam_gather_copies_rows_and_step():
    s = Adam(torch.arange(6.0).reshape(3, 2), torch.arange(6.0).reshape(3, 2) * 10, step=4)
    g = s.gather(torch.tensor([2, 2, 0]))
    assert g.step == 4
    assert g.m.tolist() == [[4.0, 5.0], [4.0, 5.0], [0.0, 1.0]]
    assert g.v.tolist() == [[40.0, 50.0], [40.0, 50.0], [0.0, 10.0]]
