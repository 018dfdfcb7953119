"""Target hidden states z: the loss, batching exactness, the two-step schedule, clamping and Adam."""

from __future__ import annotations

import copy
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from reference import ridge_fit

from ece.config import EditCfg, Params, ZCfg
from ece.data.facts import Fact
from ece.editing import zvec
from ece.editing.keys import keys_and_hidden
from ece.editing.zvec import (
    ColdStarts,
    DeltaPredictor,
    EarlierObjects,
    ZProblem,
    ZState,
    build_problem,
    clamp_rows,
    compute_z,
    fact_losses,
    object_embeddings,
    optimise,
    row_lr,
    target_ids,
    two_step_z,
    warm_start_groups,
    window_shares,
)
from ece.methods import method_of
from ece.model.adapter import ModelAdapter
from ece.model.prompts import document_start
from ece.model.workbench import Workbench

LAYER = 2
TEMPLATES = ["{}", "Once upon a time. {}"]
ATOL = 1e-5


def cfg(shared: int = 2, instance: int = 2, **kw) -> ZCfg:
    """No stop rule unless a test asks for one: tests compare exact step counts."""
    return ZCfg(shared_steps=shared, instance_steps=instance, **{"stop_loss": 0.0, **kw})


@pytest.fixture(params=["tiny_llama", "tiny_gpt2"])
def setup(request, facts):
    model, tok = request.getfixturevalue(request.param)
    adapter = ModelAdapter(model)
    facts = facts[:3]
    problem = build_problem(adapter, tok, facts, LAYER, TEMPLATES)
    return model, tok, adapter, facts, problem


@pytest.fixture(params=["tiny_llama", "tiny_gpt2"])
def four(request, facts):
    """(adapter, problem) of all four facts: two anchors with one member each."""
    model, tok = request.getfixturevalue(request.param)
    adapter = ModelAdapter(model)
    return adapter, build_problem(adapter, tok, facts, LAYER, TEMPLATES)


def zeros(problem: ZProblem) -> torch.Tensor:
    return torch.zeros(problem.n_facts, problem.h.shape[1])


def alone(problem: ZProblem, i: int) -> ZProblem:
    return problem.subset(torch.tensor([i]))


def fresh(problem: ZProblem) -> ZState:
    return ZState.zeros(problem.n_facts, problem.h.shape[1])


def run(problem: ZProblem, adapter, steps: int, c: ZCfg, state: ZState | None = None) -> ZState:
    """Up to `steps` steps on every fact as its own anchor, from `state`'s δ and Adam moments (a copy)."""
    start = fresh(problem) if state is None else state.rows(torch.arange(problem.n_facts))
    start.steps.zero_()
    each = torch.arange(problem.n_facts)
    return optimise(problem, adapter, LAYER, start, each, replace(c, shared_steps=0, instance_steps=steps))


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


def test_kl_at_a_moved_delta_matches_full_forward(setup):
    """KL(original ‖ edited) at the subject's last token of "{subject} is a", each side from a full
    forward of the model (δ added by a hook), against fact_losses' blocks of trimmed rows."""
    model, tok, adapter, facts, problem = setup
    delta = torch.randn(problem.n_facts, problem.h.shape[1], generator=torch.Generator().manual_seed(2))
    got = fact_losses(problem, adapter, LAYER, delta, cfg()).kl
    for i, fact in enumerate(facts):
        pos = len(document_start(tok) + tok(fact.subject, add_special_tokens=False).input_ids) - 1
        ids = torch.tensor([document_start(tok) + tok(f"{fact.subject} is a", add_special_tokens=False).input_ids])

        def hook(_m, _i, out, row=delta[i], pos=pos):
            hs = (out[0] if isinstance(out, tuple) else out).clone()
            hs[0, pos] += row
            return (hs, *out[1:]) if isinstance(out, tuple) else hs

        with torch.no_grad():
            ref = F.log_softmax(model(input_ids=ids).logits[0, pos], dim=-1)
            handle = adapter.blocks[LAYER].register_forward_hook(hook)
            try:
                cur = F.log_softmax(model(input_ids=ids).logits[0, pos], dim=-1)
            finally:
                handle.remove()
        assert torch.allclose(got[i], (ref.exp() * (ref - cur)).sum(), atol=1e-5)


def _record_forwards(monkeypatch, adapter) -> list[tuple[int, int, int, int]]:
    """(rows, tokens, prefix tokens, mask columns) of every forward fact_losses runs above the layer."""
    shapes = []
    original = adapter.final_hidden_from

    def recording(layer, hidden, attn, positions, prefix):
        seen = next(iter(prefix.values()))[0].shape[2] if prefix else 0
        shapes.append((hidden.shape[0], hidden.shape[1], seen, attn.shape[-1]))
        return original(layer, hidden, attn, positions, prefix)

    monkeypatch.setattr(adapter, "final_hidden_from", recording)
    return shapes


def test_without_a_forward_cost_a_pass_runs_no_padding(four, monkeypatch):
    """With merging off, each run of rows of one length is its own forward: the tokens run are exactly
    the rows' own tokens, and each block sees only as much prefix as its longest-prefix row."""
    adapter, problem = four
    assert len(set(problem.own_len.tolist())) > 1  # the facts' rows differ in length: something to cut
    shapes = _record_forwards(monkeypatch, adapter)
    monkeypatch.setattr(ZProblem, "blocks", lambda self, f=ZProblem.blocks: f(self, 0))
    fact_losses(problem, adapter, LAYER, zeros(problem), cfg())
    assert sum(rows * width for rows, width, _, _ in shapes) == int(problem.own_len.sum())
    starts = [0, *torch.tensor([rows for rows, *_ in shapes]).cumsum(0).tolist()]
    for (_, width, seen, cols), a, b in zip(shapes, starts, starts[1:]):
        assert seen == int(problem.prefix_len[a:b].max()) and cols == seen + width
        assert (problem.own_len[a:b] == width).all()


def _cheapest_split(widths: list[int], counts: list[int], forward_cost: int) -> int:
    """Brute force: every way to cut the sorted runs into consecutive blocks, the least total cost."""
    best = None
    for mask in range(2 ** (len(widths) - 1)):
        cost, rows = 0, 0
        for k, (w, c) in enumerate(zip(widths, counts)):
            rows += c
            if k == len(widths) - 1 or mask >> k & 1:  # a block ends after run k
                cost, rows = cost + rows * w + forward_cost, 0
        best = cost if best is None else min(best, cost)
    return best


@pytest.mark.parametrize("forward_cost", [0, 3, 64, 10_000])
def test_blocks_are_the_cheapest_split_of_the_runs(forward_cost):
    """The split of rows into blocks against a brute force over all splits, on random run lengths;
    the blocks cover the rows in order and each is as long as its longest row."""
    g = torch.Generator().manual_seed(forward_cost)
    for _ in range(20):
        own = torch.sort(torch.randint(1, 9, (int(torch.randint(1, 40, (1,), generator=g)),), generator=g)).values
        problem = SimpleNamespace(own_len=own)
        got = ZProblem.blocks(problem, forward_cost)  # type: ignore[arg-type]
        assert [a for a, _, _ in got] == [0, *[b for _, b, _ in got[:-1]]] and got[-1][1] == len(own)
        assert all(w == int(own[a:b].max()) for a, b, w in got)
        widths, counts = (x.tolist() for x in torch.unique_consecutive(own, return_counts=True))
        assert sum((b - a) * w + forward_cost for a, b, w in got) == _cheapest_split(widths, counts, forward_cost)
    one_fact = torch.tensor([1, 5, 5, 5, 5, 5, 5])  # its KL row and six NLL rows: one forward, not two
    assert ZProblem.blocks(SimpleNamespace(own_len=one_fact), 64) == [(0, 7, 5)]  # type: ignore[arg-type]


def test_merged_blocks_give_the_same_losses(four, monkeypatch):
    """Padding a block to its longest row changes nothing but rounding: losses with every run its
    own block, with everything in one block, and with the default merging agree."""
    adapter, problem = four
    delta = torch.randn(problem.n_facts, problem.h.shape[1], generator=torch.Generator().manual_seed(3))
    runs = {}
    original = ZProblem.blocks
    for cost in (0, 10**9, zvec.BLOCK_FORWARD_COST):
        with monkeypatch.context() as m:
            m.setattr(ZProblem, "blocks", lambda self, cost=cost: original(self, cost))
            runs[cost] = fact_losses(problem, adapter, LAYER, delta, cfg()).total
    assert len(ZProblem.blocks(problem, 10**9)) == 1 < len(ZProblem.blocks(problem, 0))
    for total in runs.values():
        assert torch.allclose(total, runs[0], atol=1e-5)


def test_problem_h_and_kl_reference(setup):
    model, tok, adapter, facts, problem = setup
    _, h = keys_and_hidden(adapter, tok, facts, TEMPLATES, [LAYER], LAYER)
    assert torch.allclose(problem.h, h, atol=1e-6)  # the bare prompt (template "{}"), not an average
    for i, fact in enumerate(facts):
        # MEMIT's compute_z: the KL is taken at the subject's last token of "{subject} is a"
        subject = document_start(tok) + tok(fact.subject, add_special_tokens=False).input_ids
        ids = torch.tensor([document_start(tok) + tok(f"{fact.subject} is a", add_special_tokens=False).input_ids])
        with torch.no_grad():
            ref = F.log_softmax(model(input_ids=ids).logits[0, len(subject) - 1], dim=-1)
        assert torch.allclose(problem.kl_ref[i], ref, atol=1e-5)
        row = problem.kl_rows[i]
        assert int(problem.position_ids[row, 0]) == len(subject) - 1  # token 0 counts from the subject
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
    batched = run(problem, adapter, 3, c)
    assert batched.t.tolist() == [3] * problem.n_facts and batched.steps.tolist() == [3] * problem.n_facts
    assert batched.delta.abs().sum(1).gt(0).all()
    for i in range(problem.n_facts):
        single = run(alone(problem, i), adapter, 3, c)
        assert torch.allclose(batched.delta[i], single.delta[0], atol=ATOL), i
        assert torch.allclose(batched.m[i], single.m[0], atol=ATOL)


class _Descent:
    """One fact's descent as MEMIT's compute_z loop writes it, with torch's own Adam (independent of
    optimise): each `pass_` is a forward, a stop if the rule holds (before stepping), else backward,
    step, clamp."""

    def __init__(self, p: ZProblem, c: ZCfg, delta: torch.Tensor, adam: dict | None = None):
        self.p, self.c = p, c
        self.delta = delta.detach().clone().reshape(1, -1).requires_grad_(True)
        self.opt = torch.optim.Adam([self.delta], lr=c.lr, betas=(0.9, 0.999), eps=1e-8)
        if adam is not None:
            self.opt.state[self.delta] = copy.deepcopy(adam)
        self.taken, self.stopped = 0, False

    def pass_(self, adapter, rule) -> None:
        losses = fact_losses(self.p, adapter, LAYER, self.delta, self.c)
        if rule(losses):
            self.stopped = True
            return
        self.opt.zero_grad()
        losses.total.sum().backward()
        self.opt.step()
        self.taken += 1
        with torch.no_grad():
            limit = self.c.clamp_norm_factor * self.p.h.norm()
            if self.delta.norm() > limit:
                self.delta.mul_(limit / self.delta.norm())

    def run(self, adapter, steps: int, rule) -> _Descent:
        """Up to `steps` more passes, fewer once the rule holds."""
        for _ in range(steps):
            if self.stopped:
                break
            self.pass_(adapter, rule)
        return self

    def member(self, p: ZProblem, carry_adam: bool) -> _Descent:
        """A member's descent from z.warm_scale × this descent's δ as it is now."""
        return _Descent(p, self.c, self.c.warm_scale * self.delta, self.opt.state[self.delta] if carry_adam else None)


def _reference_loop(problem, adapter, i, c, steps, rule):
    d = _Descent(alone(problem, i), c, torch.zeros(problem.h.shape[1])).run(adapter, steps, rule)
    return d.delta.detach()[0], d.taken


@pytest.mark.parametrize("rule", ["loss", "nll"])
def test_early_stop_batched_equals_per_fact_loop(setup, rule):
    """Facts that meet the stop rule leave the batch; the others go on exactly as they would alone."""
    *_, adapter, _, problem = setup
    free = fact_losses(problem, adapter, LAYER, zeros(problem), cfg())
    before = run(problem, adapter, 6, cfg())
    after = fact_losses(problem, adapter, LAYER, before.delta, cfg())
    # thresholds between the facts' start and end values, so facts stop at different steps
    key = "total" if rule == "loss" else "nll"
    start, end = getattr(free, key), getattr(after, key)
    threshold = float(torch.quantile(torch.cat([start, end]), 0.4))
    c = cfg(0, 6, **({"stop_loss": threshold} if rule == "loss" else {"stop_nll": threshold}))
    res = two_step_z(problem, adapter, LAYER, torch.arange(problem.n_facts), torch.arange(problem.n_facts), c)
    taken = []
    for i in range(problem.n_facts):
        delta, n = _reference_loop(problem, adapter, i, c, 6, lambda l: float(getattr(l, key)[0].detach()) < threshold)
        taken.append(n)
        assert torch.allclose(res.delta[i], delta, atol=ATOL), i
    assert res.steps.tolist() == taken
    assert len(set(taken)) > 1, taken  # the facts really stopped at different steps


def test_stop_rule_off_takes_every_step(setup):
    *_, adapter, _, problem = setup
    res = two_step_z(problem, adapter, LAYER, torch.arange(3), torch.arange(3), cfg(2, 3, stop_loss=0.0, stop_nll=0.0))
    assert res.steps.tolist() == [5, 5, 5]


def test_early_stop_with_a_huge_threshold_takes_no_step(setup):
    *_, adapter, _, problem = setup
    res = two_step_z(problem, adapter, LAYER, torch.tensor([0, 0, 1]), torch.tensor([1, 2]), cfg(3, 3, stop_loss=1e9))
    assert res.steps.tolist() == [0, 0, 0]
    assert torch.equal(res.delta, torch.zeros_like(res.delta))


def test_lr_scaled_to_the_norm_of_h():
    h = torch.tensor([[3.0, 4.0, 0.0, 0.0], [0.0, 0.0, 0.0, 2.0]])
    assert row_lr(h, ZCfg(lr=0.5)).flatten().tolist() == [0.5, 0.5]
    # lr·‖h‖/√d, d = 4: 0.5·5/2 and 0.5·2/2
    assert torch.allclose(row_lr(h, ZCfg(lr=0.5, lr_scale="norm")).flatten(), torch.tensor([1.25, 0.5]))


def test_batched_two_step_equals_per_fact_schedule(setup):
    *_, adapter, _, problem = setup
    c = cfg(2, 2)
    labels, anchors = torch.tensor([0, 0, 1]), torch.tensor([1, 2])
    res = two_step_z(problem, adapter, LAYER, labels, anchors, c)
    for i in range(problem.n_facts):
        a = int(anchors[labels[i]])
        shared = run(alone(problem, a), adapter, c.shared_steps, c)
        shared.steps.zero_()
        delta = run(alone(problem, i), adapter, c.instance_steps, c, shared).delta
        assert torch.allclose(res.delta[i], delta[0], atol=ATOL), i
    assert torch.allclose(res.z, res.h + res.delta)
    assert torch.equal(res.h, problem.h)
    # an anchor took its shared and its instance steps, a member only its instance steps
    assert res.steps.tolist() == [2, 4, 4]


# --- (2a) one loop: a member joins as soon as its own anchor is through its shared steps ---------


def _plain_losses(problem: ZProblem, adapter, c: ZCfg, key: str, passes: int) -> torch.Tensor:
    """(n, passes): loss `key` of each fact at the check of each pass of its plain descent from 0."""
    out = []
    for i in range(problem.n_facts):
        d = _Descent(alone(problem, i), c, torch.zeros(problem.h.shape[1]))
        row = []
        for _ in range(passes):
            with torch.no_grad():
                row.append(float(getattr(fact_losses(d.p, adapter, LAYER, d.delta, c), key)[0]))
            d.pass_(adapter, lambda _losses: False)
        out.append(row)
    return torch.tensor(out)


def _one_loop_reference(problem: ZProblem, adapter, starts_from: torch.Tensor, c: ZCfg, rule):
    """The release rule simulated fact by fact on a clock of passes: before each pass every waiting
    member whose anchor has stopped or taken shared_steps starts from the anchor's δ as it is then;
    a pass runs every fact that has not stopped and has steps left (anchor: shared + instance,
    member: instance). Returns each fact's descent and the facts of every pass."""
    n = problem.n_facts
    anchor = [int(starts_from[i]) == i for i in range(n)]
    limit = [c.shared_steps + c.instance_steps if anchor[i] else c.instance_steps for i in range(n)]
    runs = {i: _Descent(alone(problem, i), c, torch.zeros(problem.h.shape[1])) for i in range(n) if anchor[i]}
    passes = []
    while True:
        for i in range(n):
            a = runs.get(int(starts_from[i]))
            if i not in runs and (a.stopped or a.taken >= c.shared_steps):
                runs[i] = a.member(alone(problem, i), c.carry_adam)
        active = [i for i in sorted(runs) if not runs[i].stopped and runs[i].taken < limit[i]]
        if not active:
            return runs, passes
        passes.append(active)
        for i in active:
            runs[i].pass_(adapter, rule)


def _two_phase_reference(problem: ZProblem, adapter, starts_from: torch.Tensor, c: ZCfg, rule, start=None):
    """The schedule before the one loop, each fact alone with torch's Adam: shared_steps on every
    anchor (from its row of `start`, else zero), then instance_steps on every fact,
    members from z.warm_scale × their anchor's δ at the end of the shared phase."""
    n = problem.n_facts
    d = problem.h.shape[1]
    start = torch.zeros(n, d) if start is None else start
    anchors = {
        i: _Descent(alone(problem, i), c, start[i]).run(adapter, c.shared_steps, rule)
        for i in range(n)
        if int(starts_from[i]) == i
    }
    runs = {
        i: anchors[i] if i in anchors else anchors[int(starts_from[i])].member(alone(problem, i), c.carry_adam)
        for i in range(n)
    }
    for run_i in runs.values():
        run_i.run(adapter, c.instance_steps, rule)
    return runs


def _record_passes(monkeypatch, problem: ZProblem) -> list[list[int]]:
    """Which facts (indices into `problem`) every forward pass of optimise runs."""
    passes: list[list[int]] = []
    real = zvec.fact_losses

    def recording(sub, *args):
        passes.append([int(torch.nonzero((problem.h == h).all(1))) for h in sub.h])
        return real(sub, *args)

    monkeypatch.setattr(zvec, "fact_losses", recording)
    return passes


def _stop_cfg(key: str, threshold: float, **kw) -> ZCfg:
    return cfg(**kw, **({"stop_loss": threshold} if key == "total" else {"stop_nll": threshold}))


def _below(key: str, threshold: float):
    return lambda losses: float(getattr(losses, key)[0].detach()) < threshold


@pytest.mark.parametrize("carry", [False, True])
@pytest.mark.parametrize("key", ["total", "nll"])
def test_one_loop_equals_per_fact_release_rule(four, monkeypatch, key, carry):
    """(a) + (c). Anchor A meets the stop rule within its shared steps, anchor B does not: A's member
    joins the pass after A stops, B's after B's shared steps. Every δ, step count and the facts of
    every pass are those of the per-fact simulation; rows = steps + the pass a stopped fact stops in."""
    adapter, problem = four
    shared, instance = 3, 3
    checks = _plain_losses(problem, adapter, cfg(), key, shared).min(1).values  # best of the shared checks
    a, b = int(checks.argmin()), int(checks.argmax())
    member_a, member_b = (i for i in range(4) if i not in (a, b))
    starts_from = torch.tensor([0, 1, 2, 3])
    starts_from[member_a], starts_from[member_b] = a, b
    threshold = float(checks[a] + checks[b]) / 2
    c = _stop_cfg(key, threshold, shared=shared, instance=instance, carry_adam=carry)
    passes = _record_passes(monkeypatch, problem)
    state = optimise(problem, adapter, LAYER, fresh(problem), starts_from, c)
    runs, expect = _one_loop_reference(problem, adapter, starts_from, c, _below(key, threshold))
    assert runs[a].stopped and runs[a].taken < shared and runs[b].taken >= shared  # the scenario holds
    assert passes == expect
    first = {i: next(j for j, p in enumerate(passes) if i in p) for i in range(4)}
    assert first[member_a] == runs[a].taken + 1 < shared  # joined while B was still in its shared steps
    assert first[member_b] == shared
    for i in range(4):
        assert torch.allclose(state.delta[i], runs[i].delta.detach()[0], atol=ATOL), i
    assert state.steps.tolist() == [runs[i].taken for i in range(4)]
    assert state.done.tolist() == [runs[i].stopped for i in range(4)]
    assert sum(map(len, passes)) == int(state.steps.sum()) + int(state.done.sum())


@pytest.mark.parametrize("carry", [False, True])
@pytest.mark.parametrize("stop", ["anchors stop early", "off"])
def test_one_loop_equals_two_phases(four, carry, stop):
    """(b) The two phases run one after the other give the same z and steps: with every anchor
    stopping within its shared steps (members then start from the δ their anchor stopped at), and
    without a stop rule."""
    adapter, problem = four
    labels, anchors = torch.tensor([0, 0, 1, 1]), torch.tensor([1, 3])
    starts_from = anchors[labels]
    shared, instance = 4, 2
    # every anchor meets the threshold at one of its first 2 checks
    threshold = float(_plain_losses(problem, adapter, cfg(), "total", 2).min(1).values[anchors].max()) + 1e-3
    threshold = threshold if stop != "off" else 0.0
    c = cfg(shared, instance, carry_adam=carry, stop_loss=threshold)
    res = two_step_z(problem, adapter, LAYER, labels, anchors, c)
    runs = _two_phase_reference(problem, adapter, starts_from, c, _below("total", threshold))
    for i in range(4):
        assert torch.allclose(res.delta[i], runs[i].delta.detach()[0], atol=ATOL), i
    assert res.steps.tolist() == [runs[i].taken for i in range(4)]
    anchor_steps = [runs[int(a)].taken for a in anchors]
    assert all(t < shared for t in anchor_steps) if stop != "off" else anchor_steps == [shared + instance] * 2


def test_waiting_members_cost_no_rows(four, monkeypatch):
    """(c) Without a stop rule: 3 passes of the two anchors, then 2 of all four facts (hand-worked);
    rows = the sum of the facts' steps."""
    adapter, problem = four
    passes = _record_passes(monkeypatch, problem)
    state = optimise(problem, adapter, LAYER, fresh(problem), torch.tensor([1, 1, 3, 3]), cfg(3, 2))
    assert passes == [[1, 3]] * 3 + [[0, 1, 2, 3]] * 2
    assert state.steps.tolist() == [2, 5, 2, 5]
    assert sum(map(len, passes)) == int(state.steps.sum()) == 14


# --- (2) the two-step schedule -----------------------------------------------------------------


def test_shared_phase_runs_on_anchors_only(setup):
    *_, adapter, _, problem = setup
    labels, anchors = torch.tensor([0, 0, 1]), torch.tensor([1, 2])
    s = 3
    res = two_step_z(problem, adapter, LAYER, labels, anchors, cfg(s, 0))
    shared = run(problem.subset(anchors), adapter, s, cfg(s, 0)).delta
    # with no instance steps every member carries its anchor's δ
    assert torch.allclose(res.delta[0], shared[0], atol=ATOL)
    assert torch.allclose(res.delta[1], shared[0], atol=ATOL)
    assert torch.allclose(res.delta[2], shared[1], atol=ATOL)
    # fact 0 did not take part: its own optimisation would give something else
    own = run(alone(problem, 0), adapter, s, cfg(s, 0)).delta
    assert not torch.allclose(own[0], res.delta[0], atol=1e-3)
    # the returned losses are those of the returned δ
    losses = fact_losses(problem, adapter, LAYER, res.delta, cfg(s, 0))
    assert torch.allclose(losses.total, res.losses.total, atol=1e-6)


@pytest.mark.parametrize("carry", [True, False])
def test_members_start_from_anchor_delta_and_adam_state(setup, carry):
    *_, adapter, _, problem = setup
    s, t = 2, 2
    c = cfg(s, t, carry_adam=carry)
    labels, anchors = torch.tensor([0, 0, 1]), torch.tensor([1, 2])
    res = two_step_z(problem, adapter, LAYER, labels, anchors, c)
    # an anchor continues uninterrupted: plain s + t steps on itself
    for a in (1, 2):
        plain = run(alone(problem, a), adapter, s + t, c).delta
        assert torch.allclose(res.delta[a], plain[0], atol=ATOL)
    # a member: t steps from the anchor's δ, with its Adam moments (bias correction continues at
    # step s) or with fresh ones
    shared = run(alone(problem, 1), adapter, s, c)
    start = (
        shared
        if carry
        else ZState(
            shared.delta,
            *(torch.zeros_like(x) for x in (shared.m, shared.v, shared.t)),
            torch.zeros(1, dtype=torch.long),
            torch.zeros(1, dtype=torch.bool),
        )
    )
    expect = run(alone(problem, 0), adapter, t, c, start.rows(torch.tensor([0]))).delta
    assert torch.allclose(res.delta[0], expect[0], atol=ATOL)
    other = (
        run(
            alone(problem, 0),
            adapter,
            t,
            c,
            (
                start
                if not carry
                else ZState(
                    shared.delta,
                    *(torch.zeros_like(x) for x in (shared.m, shared.v, shared.t)),
                    torch.zeros(1, dtype=torch.long),
                    torch.zeros(1, dtype=torch.bool),
                )
            ).rows(torch.tensor([0])),
        ).delta
        if carry
        else None
    )
    if other is not None:
        assert not torch.allclose(res.delta[0], other[0], atol=1e-4)  # the Adam state does matter


@pytest.mark.parametrize(("s", "t"), [(2, 2), (0, 3), (3, 0)])
def test_singleton_clusters_are_plain_memit(setup, s, t):
    *_, adapter, _, problem = setup
    n = problem.n_facts
    res = two_step_z(problem, adapter, LAYER, torch.arange(n), torch.arange(n), cfg(s, t))
    plain = run(problem, adapter, s + t, cfg(s, t)).delta
    assert torch.allclose(res.delta, plain, atol=ATOL)


def test_warm_start_groups():
    labels, anchors = torch.tensor([0, 1, 0, 1, 2]), torch.tensor([2, 1, 4])
    targets = ["Rome", "Rome", "Paris", "Paris", "Rome"]
    assert [x.tolist() for x in warm_start_groups("cluster", labels, anchors, targets)] == [[0, 1, 0, 1, 2], [2, 1, 4]]
    assert [x.tolist() for x in warm_start_groups("none", labels, anchors, targets)] == [
        [0, 1, 2, 3, 4],
        [0, 1, 2, 3, 4],
    ]
    # object: facts with the same target, the first of each as anchor
    assert [x.tolist() for x in warm_start_groups("object", labels, anchors, targets)] == [[0, 0, 1, 1, 0], [0, 2]]
    # cluster_object: (cluster, target) pairs; cluster 0's anchor (fact 2, Paris) anchors its Paris part,
    # cluster 1's anchor (fact 1, Rome) its Rome part, cluster 2's anchor (fact 4) its own
    got = warm_start_groups("cluster_object", labels, anchors, targets)
    assert got[0].tolist() == [0, 1, 2, 3, 4] and got[1].tolist() == [0, 1, 2, 3, 4]
    labels2 = torch.tensor([0, 0, 0, 0, 0])
    got = warm_start_groups("cluster_object", labels2, torch.tensor([3]), targets)
    assert got[0].tolist() == [0, 0, 1, 1, 0] and got[1].tolist() == [0, 3]


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
    delta = run(problem, adapter, 3, c).delta
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
    state = ZState.zeros(3, 4)
    state.delta = x0.clone()
    rows = torch.arange(3)
    for _ in range(6):
        opt.zero_grad()
        loss(ref).backward()
        opt.step()
        p = state.delta.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(loss(p), p)
        state.adam(rows, grad, torch.full((3, 1), lr))
        assert torch.allclose(state.delta, ref.detach(), atol=1e-6, rtol=1e-5)
    assert state.t.tolist() == [6, 6, 6]
    st = opt.state[ref]
    assert torch.allclose(state.m, st["exp_avg"], atol=1e-6)
    assert torch.allclose(state.v, st["exp_avg_sq"], atol=1e-6)


def test_zstate_rows_and_put():
    s = ZState.zeros(3, 2)
    s.m = torch.arange(6.0).reshape(3, 2)
    s.t = torch.tensor([4, 5, 6])
    g = s.rows(torch.tensor([2, 2, 0]))
    assert g.m.tolist() == [[4.0, 5.0], [4.0, 5.0], [0.0, 1.0]] and g.t.tolist() == [6, 6, 4]
    g.m += 1  # a copy, not a view
    assert s.m[2].tolist() == [4.0, 5.0]
    s.put(torch.tensor([1]), g.rows(torch.tensor([0])))
    assert s.m[1].tolist() == [5.0, 6.0] and s.t[1] == 6


def test_facts_per_pass_equals_the_batched_descent(setup):
    """The reference's one-fact-at-a-time z and the batched z are the same numbers."""
    model, tok, adapter, facts, problem = setup
    n = len(facts)
    c = cfg(0, 4, stop_loss=0.0)
    batched = compute_z(adapter, tok, facts, LAYER, TEMPLATES, torch.arange(n), torch.arange(n), c)
    one_by_one = compute_z(
        adapter,
        tok,
        facts,
        LAYER,
        TEMPLATES,
        torch.arange(n),
        torch.arange(n),
        cfg(0, 4, stop_loss=0.0, facts_per_pass=1),
    )
    assert torch.allclose(batched.z, one_by_one.z, atol=ATOL)
    assert torch.allclose(batched.losses.total, one_by_one.losses.total, atol=ATOL)
    assert batched.steps.tolist() == one_by_one.steps.tolist() == [4] * n


@pytest.mark.parametrize("per_pass", [1, 3])
def test_facts_per_pass_keeps_ece_groups_and_bounds_each_forward(four, monkeypatch, per_pass):
    """ECE's anchors and members with a stop rule, N facts per forward/backward: the same δ, steps and
    members' starts as all facts in one forward, and no forward holds more than N facts."""
    adapter, problem = four
    labels, anchors = torch.tensor([0, 0, 1, 1]), torch.tensor([1, 3])
    threshold = float(_plain_losses(problem, adapter, cfg(), "nll", 3).median())
    together = two_step_z(problem, adapter, LAYER, labels, anchors, cfg(3, 2, stop_loss=0.0, stop_nll=threshold))
    passes = _record_passes(monkeypatch, problem)
    c = cfg(3, 2, stop_loss=0.0, stop_nll=threshold, facts_per_pass=per_pass)
    chunked = optimise(problem, adapter, LAYER, fresh(problem), anchors[labels], c)
    assert torch.allclose(chunked.delta, together.delta, atol=ATOL)
    assert chunked.steps.tolist() == together.steps.tolist()
    assert max(map(len, passes)) <= per_pass and sum(map(len, passes)) >= int(chunked.steps.sum())


@pytest.mark.parametrize("kind_fixture", ["tiny_llama", "tiny_gpt2"])
def test_z_descent_in_a_bfloat16_copy(request, kind_fixture, facts):
    """z.dtype bfloat16: δ from a bfloat16 copy, h (hence z = h + δ) from the float32 model, the model untouched."""
    model, tok = request.getfixturevalue(kind_fixture)
    p = Params(edit=EditCfg(layers=[LAYER]), z=cfg(shared=0, instance=6, lr=0.5, dtype="bfloat16"))
    wb = Workbench.of(model, tok, replace(p, z=replace(p.z, n_context=1)))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    each = torch.arange(len(facts))
    low = zvec.batch_z(wb, p, method_of(p), facts, each, each)
    full = zvec.batch_z(wb, replace(p, z=replace(p.z, dtype="model")), method_of(p), facts, each, each)
    assert all(torch.equal(v, model.state_dict()[k]) and v.dtype == torch.float32 for k, v in before.items())
    for i, f in enumerate(facts):  # h by hand: the block output at the subject's last token of the bare prompt
        head = f.prompt[: f.prompt.index("{}")] + f.subject
        ids = document_start(tok) + tok(f.prompt.format(f.subject), add_special_tokens=False).input_ids
        pos = len(document_start(tok) + tok(head, add_special_tokens=False).input_ids) - 1
        with torch.no_grad():
            h = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[LAYER + 1][0, pos]
        assert torch.allclose(low.h[i], h, atol=1e-5)
    assert torch.equal(low.z, low.h + low.delta)
    assert not torch.equal(low.delta, full.delta)  # the copy's passes did run in bfloat16 ...
    assert F.cosine_similarity(low.delta, full.delta, dim=1).min() > 0.9  # ... and follow the float32 descent


def test_bfloat16_z_on_a_cpu_without_bfloat16_units_warns(monkeypatch, tiny_llama):
    adapter = ModelAdapter(tiny_llama[0])
    monkeypatch.setattr(zvec, "native_cpu_bfloat16", lambda: False)
    with pytest.warns(UserWarning, match="emulated and slower"):
        assert zvec.z_adapter(adapter, "bfloat16").dtype == torch.bfloat16
    assert zvec.z_adapter(adapter, "model") is adapter and zvec.z_adapter(adapter, "float32") is adapter


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_anchors_start_from_the_given_delta_members_from_their_anchor(four, scale):
    """`start` (z.warm_from_earlier): each anchor's descent starts from its row; a member's row is ignored
    (it starts from z.warm_scale × its anchor's δ) — against each fact alone with torch's Adam."""
    adapter, problem = four
    labels, anchors = torch.tensor([0, 0, 1, 1]), torch.tensor([1, 3])
    start = 0.3 * torch.randn(4, problem.h.shape[1], generator=torch.Generator().manual_seed(0))
    c = cfg(3, 2, warm_scale=scale)
    res = two_step_z(problem, adapter, LAYER, labels, anchors, c, start)
    runs = _two_phase_reference(problem, adapter, anchors[labels], c, lambda _: False, start)
    for i in range(4):
        assert torch.allclose(res.delta[i], runs[i].delta.detach()[0], atol=ATOL), i
    from_zero = two_step_z(problem, adapter, LAYER, labels, anchors, c)
    assert not torch.allclose(res.delta[1], from_zero.delta[1], atol=1e-3)  # the start mattered


def test_earlier_objects_give_anchors_the_mean_delta_of_their_object():
    """Hand-worked: batch 1 edits A, B, A; in batch 2 the anchor with A starts from the mean of the two
    A deltas, its member and the anchor with a new object from zero; disabled, nothing starts warm."""
    fact = lambda i, target: Fact(f"f{i}", "s", "{} is", target)  # noqa: E731
    history = EarlierObjects("anchors")
    d1, d2, d3 = torch.tensor([1.0, 2.0]), torch.tensor([5.0, 5.0]), torch.tensor([3.0, -4.0])
    history.add([fact(0, "A"), fact(1, "B"), fact(2, "A")], torch.stack([d1, d2, d3]))
    batch = [fact(3, "A"), fact(4, "A"), fact(5, "C")]
    labels, anchors = torch.tensor([0, 0, 1]), torch.tensor([0, 2])  # f4 is f3's member
    start, counts, predicted = history.starts(batch, labels, anchors, 2)
    assert counts.tolist() == [2, 0, 0] and predicted.tolist() == [0, 0, 0]
    assert start is not None and start.tolist() == [[2.0, -1.0], [0.0, 0.0], [0.0, 0.0]]
    _, member_counts, _ = history.starts(batch, torch.tensor([0, 0, 1]), torch.tensor([1, 2]), 2)
    assert member_counts.tolist() == [0, 2, 0]  # f4 is the anchor now
    assert history.starts([fact(6, "C")], torch.tensor([0]), torch.tensor([0]), 2)[0] is None
    off = EarlierObjects("none")
    off.add([fact(0, "A")], d1[None])
    assert off.starts(batch, labels, anchors, 2)[0] is None
    assert history.regroup(batch, labels, anchors) == (labels, anchors)  # anchors mode keeps the groups


def test_earlier_objects_scale_the_borrowed_mean():
    """Hand-worked: the A anchor's start at z.warm_scale 0.5 is half of A's mean δ (2, -1)."""
    fact = lambda i, target: Fact(f"f{i}", "s", "{} is", target)  # noqa: E731
    history = EarlierObjects("anchors", scale=0.5)
    history.add([fact(0, "A"), fact(1, "A")], torch.tensor([[1.0, 2.0], [3.0, -4.0]]))
    start = history.starts([fact(2, "A"), fact(3, "B")], torch.tensor([0, 1]), torch.tensor([0, 1]), 2).delta
    assert start is not None and start.tolist() == [[1.0, -0.5], [0.0, 0.0]]


def test_delta_predictor_is_the_ridge_solution():
    """Fitted in two chunks, its prediction equals ridge regression solved independently as the least
    squares of [X; √λ·I] A ≈ [Y; 0] on all rows at once; before min_facts it predicts nothing."""
    g = torch.Generator().manual_seed(0)
    x, y, new = torch.randn(30, 4, generator=g), torch.randn(30, 3, generator=g), torch.randn(5, 4, generator=g)
    predictor = DeltaPredictor(ridge=2.0, min_facts=30)
    predictor.add(x[:12], y[:12])
    assert predictor.predict(new) is None  # 12 < 30 facts
    predictor.add(x[12:], y[12:])
    expected = new.double() @ ridge_fit(x, y, 2.0)
    got = predictor.predict(new)
    assert got is not None and torch.allclose(got.double(), expected, atol=1e-5)


def test_cold_anchors_start_from_the_scaled_prediction():
    """Hand-worked. A was edited before: its anchor borrows scale × A's mean δ. C and D are new objects
    whose features equal A's and B's, and with ridge λ → 0 on one-hot features the fit returns each
    feature's mean δ: C's anchor starts from gain × A's mean (3, 1), D's from gain × B's δ, C's member
    from nothing (it waits for its anchor). With fewer facts than min_facts cold anchors start from zero.
    Each predicted start records the 3 facts its fit saw."""
    fact = lambda i, target: Fact(f"f{i}", "s", "{} is", target)  # noqa: E731
    onehot = {"A": [1.0, 0.0], "B": [0.0, 1.0], "C": [1.0, 0.0], "D": [0.0, 1.0]}
    embed = lambda facts: torch.tensor([onehot[f.target_new] for f in facts])  # noqa: E731
    history = EarlierObjects("anchors", 0.5, ColdStarts(DeltaPredictor(ridge=1e-9, min_facts=3), embed, gain=2.0))
    history.add([fact(0, "A"), fact(1, "A")], torch.tensor([[2.0, 0.0], [4.0, 2.0]]))
    batch = [fact(2, "A"), fact(3, "C"), fact(4, "C")]
    labels, anchors = torch.tensor([0, 1, 1]), torch.tensor([0, 1])  # f4 is f3's member
    start, counts, predicted = history.starts(batch, labels, anchors, 2)
    assert counts.tolist() == [2, 0, 0] and predicted.tolist() == [0, 0, 0]
    assert start is not None and start.tolist() == [[1.5, 0.5], [0.0, 0.0], [0.0, 0.0]]  # 2 facts < 3: no fit
    history.add([fact(5, "B")], torch.tensor([[-1.0, 5.0]]))
    start, counts, predicted = history.starts(
        batch + [fact(6, "D")], torch.tensor([0, 1, 1, 2]), torch.tensor([0, 1, 3]), 2
    )
    assert counts.tolist() == [2, 0, 0, 0] and predicted.tolist() == [0, 3, 0, 3]
    assert start is not None
    assert torch.allclose(start, torch.tensor([[1.5, 0.5], [6.0, 2.0], [0.0, 0.0], [-2.0, 10.0]]), atol=1e-6)


def test_centered_prediction_drops_the_fitted_facts_mean_direction():
    """Hand-worked, ridge → 0 on one-hot features: the fit returns each feature's mean δ, A (2, 2) and
    B (0, 2); the fitted facts' mean δ is (1, 2), unit u = (1, 2)/√5. Centered, A's prediction (2, 2)
    loses ⟨(2, 2), u⟩u = (6/5)(1, 2): (0.8, -0.4), orthogonal to u; uncentered it is (2, 2)."""
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    y = torch.tensor([[2.0, 1.0], [2.0, 3.0], [0.0, 2.0], [0.0, 2.0]])
    plain, centered = DeltaPredictor(1e-9, 1), DeltaPredictor(1e-9, 1, center=True)
    for predictor in (plain, centered):
        predictor.add(x, y)
    a = torch.tensor([[1.0, 0.0]])
    assert torch.allclose(plain.predict(a), torch.tensor([[2.0, 2.0]]), atol=1e-6)
    got = centered.predict(a)
    assert got is not None and torch.allclose(got, torch.tensor([[0.8, -0.4]]), atol=1e-6)
    assert abs(float(got[0] @ torch.tensor([1.0, 2.0]))) < 1e-6


def test_cold_starts_embed_each_new_object_once():
    """A batch's cold anchors are embedded for their prediction and the batch again for the fit: with the
    features remembered, `embed` sees each object once over starts and add, in first-seen order, and the
    rows `features` returns are `embed`'s rows for those objects (by hand: one-hot by object)."""
    fact = lambda i, target: Fact(f"f{i}", "s", "{} is", target)  # noqa: E731
    onehot = {"A": [1.0, 0.0, 0.0], "B": [0.0, 1.0, 0.0], "C": [0.0, 0.0, 1.0]}
    seen: list[str] = []

    def embed(facts: list[Fact]) -> torch.Tensor:
        seen.extend(f.target_new for f in facts)
        return torch.tensor([onehot[f.target_new] for f in facts])

    cold = ColdStarts(DeltaPredictor(ridge=1e-9, min_facts=2), embed, gain=1.0)
    history = EarlierObjects("anchors", 1.0, cold)
    history.add([fact(0, "A"), fact(1, "B"), fact(2, "A")], torch.ones(3, 2))
    batch = [fact(3, "C"), fact(4, "C"), fact(5, "A")]
    start, _, predicted = history.starts(batch, torch.tensor([0, 0, 1]), torch.tensor([0, 2]), 2)
    assert predicted.tolist() == [3, 0, 0] and start is not None
    history.add(batch, torch.ones(3, 2))
    assert seen == ["A", "B", "C"]
    assert cold.features([fact(6, "B"), fact(7, "C"), fact(8, "B")]).tolist() == [
        onehot["B"],
        onehot["C"],
        onehot["B"],
    ]
    assert seen == ["A", "B", "C"]


def test_object_embeddings_are_the_unit_normed_first_target_token_rows(tiny_llama):
    model, tok = tiny_llama
    facts = [Fact("a", "s", "{} is", "Paris"), Fact("b", "s", "{} is", " Berlin Wall")]
    got = object_embeddings(ModelAdapter(model), tok, facts)
    table = model.get_input_embeddings().weight.detach()
    for row, target in zip(got, ["Paris", " Berlin Wall"]):
        first = tok(" " + target.lstrip(), add_special_tokens=False).input_ids[0]
        assert torch.allclose(row, table[first] / table[first].norm(), atol=1e-6)


def test_earlier_objects_all_takes_every_fact_with_an_earlier_object_out_of_its_group():
    """Hand-worked, mode `all`: A was edited before, B and C were not. Batch [A, A, B, A, C] in groups
    {f0: f0, f1, f2} and {f3: f3, f4} (mixed objects, as neuron clusters make them): f1 and f3 (A) become
    anchors of their own, f2 (B) stays with f0, f4 (C) stays with f3; groups numbered by anchor position.
    Every A fact then starts from A's mean δ, at once."""
    fact = lambda i, target: Fact(f"f{i}", "s", "{} is", target)  # noqa: E731
    history = EarlierObjects("all")
    history.add([fact(10, "A"), fact(11, "A")], torch.tensor([[2.0, 0.0], [4.0, 2.0]]))
    batch = [fact(0, "A"), fact(1, "A"), fact(2, "B"), fact(3, "A"), fact(4, "C")]
    labels, anchors = history.regroup(batch, torch.tensor([0, 0, 0, 1, 1]), torch.tensor([0, 3]))
    assert anchors.tolist() == [0, 1, 3]
    assert anchors[labels].tolist() == [0, 1, 0, 3, 3]
    start, counts, _ = history.starts(batch, labels, anchors, 2)
    assert counts.tolist() == [2, 2, 0, 2, 0]
    assert start is not None and start.tolist() == [[3.0, 1.0], [3.0, 1.0], [0.0, 0.0], [3.0, 1.0], [0.0, 0.0]]
    fresh = [fact(5, "B"), fact(6, "B")]
    same = (torch.tensor([0, 0]), torch.tensor([0]))
    assert history.regroup(fresh, *same) == same  # no earlier object: the groups as they are


@pytest.mark.parametrize("kind_fixture", ["tiny_llama", "tiny_gpt2"])
def test_frozen_prefix_runs_a_templates_shared_tokens_once(request, kind_fixture, facts, monkeypatch):
    """The prefix keys and values with each template's shared tokens run once and only the rows' tails
    after them equal those of every row's prefix run whole; and the shared part is run once per template."""
    model, tok = request.getfixturevalue(kind_fixture)
    adapter = ModelAdapter(model)
    templates = ["{}", "Once upon a time. {}", "In the beginning there was {}"]
    calls: list[tuple[int, bool]] = []
    real = adapter.prefix_kv
    monkeypatch.setattr(
        adapter, "prefix_kv", lambda *a, **k: calls.append((a[1].shape[0], len(a) > 3)) or real(*a, **k)
    )
    shared = build_problem(adapter, tok, facts, LAYER, templates)
    monkeypatch.setattr(zvec, "MIN_SHARED", 10**6)  # every group runs whole, as before the sharing
    whole = build_problem(adapter, tok, facts, LAYER, templates)
    assert (
        sum(1 for rows, tail in calls[: len(calls) // 2] if rows == 1 and not tail) >= 2
    )  # two templates' shared parts
    assert shared.prefix.keys() == whole.prefix.keys() and torch.equal(shared.prefix_len, whole.prefix_len)
    seen = torch.arange(whole.prefix[LAYER + 1][0].shape[2])[None, :] < whole.prefix_len[:, None]  # (R, P)
    assert seen.sum() > len(facts) * len(templates)
    for l, (k, v) in whole.prefix.items():  # positions past a row's prefix are masked: not compared
        for got, want in ((shared.prefix[l][0], k), (shared.prefix[l][1], v)):
            assert torch.allclose(got.transpose(1, 2)[seen], want.transpose(1, 2)[seen], atol=1e-5)


def test_delta_predictor_scale_is_the_least_squares_factor_on_held_out_facts():
    """scale = Σ⟨p, δ⟩ / Σ‖p‖² over held-out rows, each p the ridge prediction (solved independently as
    augmented least squares) of the fit as it stood before that chunk; None before any held-out row;
    rows not held out only fit; a fit pointing away from δ gives 0."""
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(40, 3, generator=g), torch.randn(40, 2, generator=g)

    predictor = DeltaPredictor(ridge=1.0, min_facts=10)
    predictor.add(x[:10], y[:10], torch.ones(10, dtype=torch.bool))  # nothing to predict with yet
    assert predictor.scale() is None
    held = torch.tensor([True, False] * 10)
    predictor.add(x[10:30], y[10:30], held)
    first = x[10:30][held].double() @ ridge_fit(x[:10], y[:10], 1.0)
    predictor.add(x[30:], y[30:], torch.ones(10, dtype=torch.bool))
    second = x[30:].double() @ ridge_fit(x[:30], y[:30], 1.0)
    p, d = torch.cat([first, second]), torch.cat([y[10:30][held], y[30:]]).double()
    got = predictor.scale()
    assert got is not None and abs(got - max(float((p * d).sum() / (p * p).sum()), 0.0)) < 1e-6
    away = DeltaPredictor(ridge=1e-9, min_facts=1)
    away.add(torch.tensor([[1.0]]), torch.tensor([[2.0, 0.0]]))
    away.add(torch.tensor([[1.0]]), torch.tensor([[-1.0, 0.0]]), torch.tensor([True]))
    assert away.scale() == 0.0


def test_calibrated_cold_starts_wait_for_a_held_out_batch_then_scale_the_prediction():
    """Hand-worked with one-hot features (ridge → 0: a prediction is the mean δ of the feature's facts).
    Batch 1 (A, A) fits. Batch 2's C (A's feature) gets no start: nothing measured yet; its δ (6, 2)
    against the prediction (3, 1) gives scale 20 / 10 = 2. Batch 3's D (A's feature) starts from
    gain × 2 × the fit on A, A, C (4, 4/3); D started from a prediction, so its δ does not change the scale."""
    fact = lambda i, target: Fact(f"f{i}", "s", "{} is", target)  # noqa: E731
    embed = lambda facts: torch.tensor([[1.0, 0.0] if f.target_new in "ACD" else [0.0, 1.0] for f in facts])  # noqa: E731
    cold = ColdStarts(DeltaPredictor(ridge=1e-9, min_facts=2), embed, gain=0.5, calibrate=True)
    history = EarlierObjects("anchors", 1.0, cold)
    one = (torch.tensor([0]), torch.tensor([0]))
    history.add([fact(0, "A"), fact(1, "A")], torch.tensor([[2.0, 0.0], [4.0, 2.0]]))
    start, _, predicted = history.starts([fact(2, "C")], *one, 2)
    assert start is None and predicted.tolist() == [0]
    history.add([fact(2, "C")], torch.tensor([[6.0, 2.0]]))
    assert cold.predictor.scale() == pytest.approx(2.0)
    start, _, predicted = history.starts([fact(3, "D")], *one, 2)
    assert start is not None and torch.allclose(
        start, torch.tensor([[4.0, 4.0 / 3.0]]), atol=1e-5
    )  # 0.5 × 2 × (4, 4/3)
    assert predicted.tolist() == [3]
    history.add([fact(3, "D")], torch.tensor([[100.0, 0.0]]))
    assert cold.predictor.scale() == pytest.approx(2.0)


def test_window_shares_split_rows_and_seconds_by_row_steps():
    """Hand-worked: batches of 2 and 3 facts with 4 and 6 of the window's 10 row-steps take 4 and 6 of
    its 10 seconds; a window that took no steps shares its seconds evenly."""
    shares = window_shares([2, 3], [1, 3, 2, 2, 2], 10.0)
    assert [(c.start, c.stop) for c, _ in shares] == [(0, 2), (2, 5)]
    assert [s for _, s in shares] == pytest.approx([4.0, 6.0])
    assert [s for _, s in window_shares([1, 1], [0, 0], 4.0)] == pytest.approx([2.0, 2.0])
