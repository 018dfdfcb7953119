"""Target hidden states z: MEMIT's objective, optimised in ECE's two steps, batched over facts.

Each fact i gets its own row δ_i added at its subject's last token after the last edited layer.
The loss is a sum of per-fact terms, so one batched forward/backward gives every row exactly the
gradient it would get alone, and a row-wise Adam makes the batched run equal to a per-fact loop.

Two steps (ECE): each group's anchor takes up to `shared_steps` Adam steps from δ = 0 (the shared
step), then every fact up to `instance_steps` (the instance step): an anchor goes on with its own
descent, a member starts from the δ its anchor's shared steps ended at (met the stop rule or took
`shared_steps`), with the anchor's Adam state when `carry_adam`, else fresh moments. So an anchor
takes at most shared_steps + instance_steps steps, a member at most instance_steps, and a singleton
group is plain MEMIT z with shared_steps + instance_steps uninterrupted steps.

Both steps run in one loop (`optimise`): a member joins as soon as its own anchor is through its
shared steps, not after every anchor's, so its rows fill passes that run anyway and a batch takes
at most shared_steps + instance_steps passes. Every fact's descent is the same as with the instance
phase run after the whole shared phase (tested); only how the rows are packed into passes differs.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase

from ece.config import Params, ZCfg
from ece.data.facts import Fact
from ece.editing.keys import KEY_BLOCK_COST, keys_and_hidden, length_sorted_blocks, templated
from ece.methods import Method
from ece.model.adapter import KV, ModelAdapter
from ece.model.loading import DTYPES
from ece.model.prompts import Encoded, at_positions, encode, length_blocks, target_ids
from ece.model.workbench import Workbench

KL_TEMPLATE = "{} is a"
# One more forward/backward of a z pass costs about as much as this many more tokens in one (on the 2-core
# CPU 47-69, from the padded vs blocks timings of reports/z_blocks.md): ZProblem.blocks merges runs of rows
# of different lengths where the padding is cheaper than another forward.
BLOCK_FORWARD_COST = 64
BETAS = (0.9, 0.999)
EPS = 1e-8


@dataclass
class ZProblem:
    """Everything the optimisation needs, computed once.

    Activations below the edit layer are fixed, and so is everything before each row's subject in
    the layers above (attention is causal): the blocks above keep those tokens' keys and values
    (`prefix`) and every step runs only the tokens from the subject on, about a fifth of the rows'
    tokens for MEMIT's prompts. Token axes below are therefore "from the subject on": index 0 is
    the subject's last token, where δ is added.

    The rows are sorted by their number of tokens read (`own_len`): `fact_losses` runs them in blocks
    of rows of about one length (`blocks`), each cut to its longest row and to the longest prefix it
    sees, so a pass computes little padding and no token that no loss reads (padded to the batch's
    longest row, a 100-fact CounterFact batch runs 2.1x the tokens; reports/z_blocks.md).
    """

    hidden: Tensor  # (R, S, d) residual stream after the edit layer from the subject on
    position_ids: Tensor  # (R, S) their positions in the full row
    attn: Tensor  # (R, 1, S, P + S) additive mask over the prefix and the row's own tokens
    prefix: KV  # keys/values of the first P tokens at every block above the edit layer
    row_fact: Tensor  # (R,) which fact a row belongs to
    labels: Tensor  # (R, S) token that logits at s must predict, -100 where no NLL
    kl_rows: Tensor  # (n,) row index of each fact's KL prompt; its KL is taken at the subject's last
    # token (token 0 of the row here, where δ is added), as MEMIT's compute_z does
    kl_ref: Tensor  # (n, V) log-probs of the unedited model there
    h: Tensor  # (n, d) residual at the subject on the bare prompt
    own_len: Tensor  # (R,) the row's tokens from the subject on up to the last one read (ascending): all
    # of an NLL row's, the first of a KL row's (attention is causal: the later ones cannot change it)
    prefix_len: Tensor  # (R,) the prefix tokens it sees (those before its subject)

    @property
    def n_facts(self) -> int:
        return self.h.shape[0]

    def subset(self, facts: Tensor) -> ZProblem:
        """The problem restricted to `facts` (renumbered 0..len-1 in the given order)."""
        remap = torch.full((self.n_facts,), -1, dtype=torch.long)
        remap[facts] = torch.arange(len(facts))
        rows = torch.nonzero(remap[self.row_fact] >= 0).squeeze(1)
        new_index = torch.full((self.hidden.shape[0],), -1, dtype=torch.long)
        new_index[rows] = torch.arange(len(rows))
        return replace(
            self,
            hidden=self.hidden[rows],
            position_ids=self.position_ids[rows],
            attn=self.attn[rows],
            prefix={l: (k[rows], v[rows]) for l, (k, v) in self.prefix.items()},
            row_fact=remap[self.row_fact[rows]],
            labels=self.labels[rows],
            kl_rows=new_index[self.kl_rows[facts]],
            kl_ref=self.kl_ref[facts],
            h=self.h[facts],
            own_len=self.own_len[rows],
            prefix_len=self.prefix_len[rows],
        )

    def blocks(self, forward_cost: int = BLOCK_FORWARD_COST) -> list[tuple[int, int, int]]:
        """(first row, end row, tokens) of the blocks a pass runs, each cut to its longest row
        (`length_blocks` over the rows' lengths, ascending by construction): a block costs its rows ×
        its length plus `forward_cost` (one more forward/backward through the blocks above the layer).
        With one fact per pass its KL row then rides along with its NLL rows instead of costing a
        forward of its own."""
        return length_blocks(self.own_len, forward_cost)


def split_at_subject(mask: Tensor, pos: Tensor) -> tuple[int, Tensor, Tensor, Tensor]:
    """Layout of the "from the subject on" tokens of right-padded rows.

    Returns the prefix length P (longest row prefix), the (R, S) index of each row's tokens from
    `pos` on in the full rows (clamped inside the row for padding), which of them are real, and the
    additive attention mask: token s sees prefix tokens before its row's subject and its own tokens
    up to s. Every query sees at least its own row's first token, so no softmax row is empty.
    """
    own_len = mask.sum(1) - pos
    width = int(own_len.max())
    n_prefix = int(pos.max())
    index = (pos[:, None] + torch.arange(width)).clamp(max=mask.shape[1] - 1)
    sees_prefix = torch.arange(n_prefix)[None, :] < pos[:, None]  # (R, P)
    real, attn = after_prefix_attn(sees_prefix, own_len, width)
    return n_prefix, index, real, attn


def after_prefix_attn(sees_prefix: Tensor, own_len: Tensor, width: int) -> tuple[Tensor, Tensor]:
    """Which of the (R, width) own tokens of rows that follow a frozen prefix are real (`own_len` per
    row), and their additive attention mask (R, 1, width, P + width): each token sees the prefix
    positions `sees_prefix` (R, P) marks and its own row's real tokens up to itself."""
    s = torch.arange(width)
    real = s[None, :] < own_len[:, None]
    sees_own = (s[None, :] <= s[:, None])[None] & real[:, None, :]  # (R, S, S)
    allowed = torch.cat([sees_prefix[:, None, :].expand(-1, width, -1), sees_own], dim=2)
    attn = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    return real, attn[:, None]


def _block_output(adapter: ModelAdapter, enc: Encoded, layer: int) -> Tensor:
    """The output of block `layer` (R, T, d) at every token of `enc`'s rows, zero in the padding. The rows
    run in blocks of about one length (`length_sorted_blocks`): a row's tokens do not depend on the
    padding after it, and one block padded to the longest row would run ~40 % padding."""
    hidden: Tensor | None = None
    for rows, width in length_sorted_blocks(enc):
        _, outs = adapter.trace(enc.input_ids[rows, :width], enc.attention_mask[rows, :width], out_layers=[layer])
        if hidden is None:
            hidden = outs[layer].new_zeros(*enc.input_ids.shape, outs[layer].shape[-1])
        hidden[rows.to(hidden.device), :width] = outs[layer]
    assert hidden is not None
    return hidden


def _frozen_prefix(
    adapter: ModelAdapter, layer: int, hidden: Tensor, mask: Tensor, prefix_len: Tensor, ids: Tensor, group: Tensor
) -> KV:
    """`adapter.prefix_kv` of the (R, P) prefix tokens, in blocks of rows of about one prefix length, each
    run only up to its longest prefix (zero beyond it: those positions are masked for the rows of the
    block, whose prefixes end there). Computing every row's keys and values up to the longest prefix of
    the batch was the costliest part of building a z problem (~0.5 s per fact on 2 cores, padded).

    Rows of one `group` (one context template) begin with the same tokens (`ids`): the document start
    and the template's text, ~11 of a CounterFact row's ~14 prefix tokens. Those are run once per group
    and only each row's own tail after them (`_prefix_tails`); causal attention makes the shared tokens'
    keys and values the same in every row. A group sharing fewer than `MIN_SHARED` tokens runs whole."""
    kv: dict[int, tuple[Tensor, Tensor]] = {}

    def put(rows: Tensor, width: int, got: KV) -> None:
        for l, (k, v) in got.items():
            if l not in kv:
                shape = (hidden.shape[0], k.shape[1], hidden.shape[1], k.shape[3])
                kv[l] = (k.new_zeros(shape), v.new_zeros(shape))
            kv[l][0][rows.to(k.device), :, :width] = k
            kv[l][1][rows.to(v.device), :, :width] = v

    whole = torch.zeros(len(prefix_len), dtype=torch.bool)
    for g in torch.unique(group).tolist():
        rows = torch.nonzero(group == g).squeeze(1)
        shared = _shared_length(ids[rows], prefix_len[rows])
        if shared < MIN_SHARED:
            whole[rows] = True
            continue
        first = rows[:1]
        common = adapter.prefix_kv(layer, hidden[first, :shared], mask[first, :shared])
        _prefix_tails(adapter, layer, hidden, prefix_len, rows, shared, common, put)
    rest = torch.nonzero(whole).squeeze(1)
    order = rest[torch.argsort(prefix_len[rest], stable=True)]
    for start, end, width in length_blocks(prefix_len[order], KEY_BLOCK_COST):
        if width == 0:  # rows whose subject opens the row: no prefix
            continue
        rows = order[start:end]
        put(rows, width, adapter.prefix_kv(layer, hidden[rows, :width], mask[rows, :width]))
    return kv


MIN_SHARED = 2  # shared tokens below which a group's prefixes are run whole (one token: the document start)


def _shared_length(ids: Tensor, prefix_len: Tensor) -> int:
    """How many first tokens every row of `ids` (rows, P) has in common, within every row's prefix."""
    shortest = int(prefix_len.min())
    same = (ids[:, :shortest] == ids[:1, :shortest]).all(0)
    differ = torch.nonzero(~same)
    return int(differ[0]) if len(differ) else shortest


def _prefix_tails(
    adapter: ModelAdapter,
    layer: int,
    hidden: Tensor,
    prefix_len: Tensor,
    rows: Tensor,
    shared: int,
    common: KV,
    put: Callable[[Tensor, int, KV], None],
) -> None:
    """The keys and values of `rows`' prefixes from their `common` first `shared` tokens' on: each row's
    tail (its prefix after them) in blocks of about one tail length, the common part as a frozen past."""
    tail = prefix_len[rows] - shared
    order = torch.argsort(tail, stable=True)
    for start, end, width in length_blocks(tail[order], KEY_BLOCK_COST):
        block = rows[order[start:end]]
        n = len(block)
        past = {l: (k.expand(n, -1, -1, -1), v.expand(n, -1, -1, -1)) for l, (k, v) in common.items()}
        if width == 0:
            put(block, shared, past)
            continue
        _, attn = after_prefix_attn(torch.ones(n, shared, dtype=torch.bool), tail[order[start:end]], width)
        positions = (shared + torch.arange(width)).expand(n, -1)
        got = adapter.prefix_kv(layer, hidden[block, shared : shared + width], attn, past, positions)
        put(block, shared + width, got)


@torch.no_grad()
def build_problem(
    adapter: ModelAdapter, tok: PreTrainedTokenizerBase, facts: list[Fact], layer: int, templates: list[str]
) -> ZProblem:
    """Encode NLL rows (every template × fact, prompt + target) and one KL row per fact; trace once."""
    targets = [target_ids(tok, f.target_new) for f in facts]
    prompts, subjects = templated(facts, templates)
    suffixes = [targets[i][:-1] for i in range(len(facts)) for _ in templates]
    prompts += [KL_TEMPLATE] * len(facts)
    subjects += [f.subject for f in facts]
    suffixes += [[] for _ in facts]
    enc = encode(tok, prompts, subjects, suffixes)
    n, t = len(facts), len(templates)
    row_fact = torch.cat([torch.arange(n).repeat_interleave(t), torch.arange(n)])
    labels = torch.full_like(enc.input_ids, -100)
    for r in range(n * t):
        tgt = targets[int(row_fact[r])]
        start = int(enc.lengths[r]) - len(tgt)  # logits at start .. start+len-1 predict the target
        labels[r, start : start + len(tgt)] = torch.tensor(tgt)
    hidden = _block_output(adapter, enc, layer)
    kl_rows = torch.arange(n * t, n * t + n)
    pos = enc.subject_pos
    final = adapter.final_hidden_from(layer, hidden[kl_rows], enc.attention_mask[kl_rows])
    kl_ref = F.log_softmax(adapter.lm_head(at_positions(final, pos[kl_rows])), dim=-1)
    h = at_positions(hidden, pos)[: n * t].reshape(n, t, -1)[:, 0]
    n_prefix, index, real, attn = split_at_subject(enc.attention_mask, pos)
    rows = torch.arange(len(pos))[:, None]
    labels_from_subject = labels[rows, index].masked_fill(~real, -100)
    assert (labels_from_subject >= 0).sum() == (labels >= 0).sum(), "a target token lies before its subject"
    own_len = real.sum(1)
    own_len[kl_rows] = 1  # the KL is read at the subject's last token, token 0
    order = torch.sort(own_len, stable=True).indices  # rows of one length side by side (ZProblem)
    new_row = torch.empty_like(order)
    new_row[order] = torch.arange(len(order))
    prefix_hidden, prefix_mask = hidden[order, :n_prefix], enc.attention_mask[order, :n_prefix]
    prefix_ids = enc.input_ids[order, :n_prefix]
    template = torch.cat([torch.arange(t).repeat(n), torch.full((n,), t)])  # the KL rows: a group of their own
    return ZProblem(
        hidden=hidden[rows, index][order],
        position_ids=index[order],
        attn=attn[order],
        prefix=_frozen_prefix(adapter, layer, prefix_hidden, prefix_mask, pos[order], prefix_ids, template[order])
        if n_prefix
        else {},
        row_fact=row_fact[order],
        labels=labels_from_subject[order],
        kl_rows=new_row[kl_rows],
        kl_ref=kl_ref,
        h=h,
        own_len=own_len[order],
        prefix_len=pos[order],
    )


@dataclass
class FactLosses:
    total: Tensor  # (n,)
    nll: Tensor
    kl: Tensor


def fact_losses(problem: ZProblem, adapter: ModelAdapter, layer: int, delta: Tensor, cfg: ZCfg) -> FactLosses:
    """MEMIT's loss per fact: mean target NLL over its prompts + kl_factor·KL + weight decay.

    Each block of rows (`ZProblem.blocks`) runs the model's layers above `layer` on its own, cut to
    its longest row and to the longest prefix it sees; the LM head, the costliest matmul, runs only
    where a target token is predicted and at the KL rows' first token."""
    n = problem.n_facts
    own_from = problem.attn.shape[-1] - problem.hidden.shape[1]  # the mask's columns of the row's own tokens
    moved = problem.hidden[:, :1] + delta[problem.row_fact, None]
    target_states, target_rows, target_labels, kl_states, kl_facts = [], [], [], [], []
    for start, end, width in problem.blocks():
        seen = int(problem.prefix_len[start:end].max())
        attn = problem.attn[start:end, :, :width]
        attn = torch.cat([attn[..., :seen], attn[..., own_from : own_from + width]], dim=-1)
        prefix = {l: (k[start:end, :, :seen], v[start:end, :, :seen]) for l, (k, v) in problem.prefix.items()}
        hidden = torch.cat([moved[start:end], problem.hidden[start:end, 1:width]], dim=1)
        positions = problem.position_ids[start:end, :width]
        final = adapter.final_hidden_from(layer, hidden, attn, positions, prefix if seen else None)
        labels = problem.labels[start:end, :width]
        r, t = torch.nonzero(labels >= 0, as_tuple=True)
        target_states.append(final[r, t]), target_rows.append(r + start), target_labels.append(labels[r, t])
        facts = torch.nonzero((problem.kl_rows >= start) & (problem.kl_rows < end)).squeeze(1)
        kl_states.append(final[problem.kl_rows[facts] - start, 0]), kl_facts.append(facts)
    logp = F.log_softmax(adapter.lm_head(torch.cat(target_states)), dim=-1)
    tok_nll = -logp.gather(1, torch.cat(target_labels).unsqueeze(1)).squeeze(1)
    r = torch.cat(target_rows)
    n_rows = problem.hidden.shape[0]
    row_nll = torch.zeros(n_rows).index_add(0, r, tok_nll)
    row_len = torch.zeros(n_rows).index_add(0, r, torch.ones_like(tok_nll))
    has_target = row_len > 0
    per_row = row_nll[has_target] / row_len[has_target]
    owner = problem.row_fact[has_target]
    nll = torch.zeros(n).index_add(0, owner, per_row) / torch.zeros(n).index_add(0, owner, torch.ones_like(per_row))
    cur = F.log_softmax(adapter.lm_head(torch.cat(kl_states)), dim=-1)
    facts = torch.cat(kl_facts)
    ref = problem.kl_ref[facts]
    kl = torch.zeros(n).index_add(0, facts, (ref.exp() * (ref - cur)).sum(1))
    decay = cfg.weight_decay * delta.norm(dim=1) / problem.h.norm(dim=1) ** 2
    return FactLosses(nll + cfg.kl_factor * kl + decay, nll, kl)


@dataclass(frozen=True)
class StopRule:
    """When a fact's δ is good enough to stop optimising it (checked at every forward pass, before the
    update, as MEMIT's compute_z does): total loss below `loss` (MEMIT's rule, 5e-2) and/or mean target
    NLL below `nll`. A threshold of 0 turns that rule off; with both off every fact takes every step."""

    loss: float = 0.0
    nll: float = 0.0

    @classmethod
    def of(cls, cfg: ZCfg) -> StopRule:
        return cls(cfg.stop_loss, cfg.stop_nll)

    def met(self, losses: FactLosses) -> Tensor:
        met = torch.zeros_like(losses.total, dtype=torch.bool)
        if self.loss > 0:
            met |= losses.total.detach() < self.loss
        if self.nll > 0:
            met |= losses.nll.detach() < self.nll
        return met


@dataclass
class ZState:
    """Per-fact optimisation state: δ, row-wise Adam moments with their own step counts (so a row can
    be handed from an anchor to its members, or started afresh), the gradient steps each fact took,
    and whether it has met the stop rule (then it is frozen and leaves the batch)."""

    delta: Tensor  # (n, d)
    m: Tensor  # (n, d) Adam first moment
    v: Tensor  # (n, d) Adam second moment
    t: Tensor  # (n,) Adam updates applied to the row (bias correction)
    steps: Tensor  # (n,) gradient steps (one forward/backward of the fact's rows) taken for this fact
    done: Tensor  # (n,) met the stop rule

    @classmethod
    def zeros(cls, n: int, d: int) -> ZState:
        z = torch.zeros(n, d)
        return cls(
            z,
            z.clone(),
            z.clone(),
            torch.zeros(n, dtype=torch.long),
            torch.zeros(n, dtype=torch.long),
            torch.zeros(n, dtype=torch.bool),
        )

    def _tensors(self) -> list[Tensor]:
        return [getattr(self, f.name) for f in fields(self)]

    def rows(self, index: Tensor) -> ZState:
        return ZState(*(x[index].clone() for x in self._tensors()))

    def put(self, index: Tensor, other: ZState) -> None:
        for mine, theirs in zip(self._tensors(), other._tensors()):
            mine[index] = theirs

    def adam(self, rows: Tensor, grad: Tensor, lr: Tensor) -> None:
        """One Adam update (torch.optim.Adam's, without weight decay) of `rows`; lr is (len(rows), 1)."""
        b1, b2 = BETAS
        self.t[rows] += 1
        t = self.t[rows].double()[:, None]  # bias corrections in float64, as torch computes them
        correct1, correct2 = (1 - b1**t).to(grad.dtype), (1 - b2**t).to(grad.dtype)
        self.m[rows] = m = b1 * self.m[rows] + (1 - b1) * grad
        self.v[rows] = v = b2 * self.v[rows] + (1 - b2) * grad * grad
        step = lr * (m / correct1) / ((v / correct2).sqrt() + EPS)
        self.delta[rows] = self.delta[rows] - step


def clamp_rows(delta: Tensor, h: Tensor, factor: float) -> Tensor:
    """Project each δ_i into the ball of radius factor·‖h_i‖ (MEMIT's norm constraint)."""
    limit = factor * h.norm(dim=1, keepdim=True)
    norm = delta.norm(dim=1, keepdim=True)
    return torch.where(norm > limit, delta * limit / norm.clamp_min(1e-12), delta)


def row_lr(h: Tensor, cfg: ZCfg) -> Tensor:
    """Step size per fact, (n, 1). Adam moves every coordinate by about lr per step, so δ grows by
    about lr·√d per step; `lr_scale: norm` makes that a fixed share of the fact's ‖h‖ (lr·‖h‖/√d
    per coordinate), so the number of steps to reach δ ≈ ‖h‖ does not depend on the layer's scale."""
    if cfg.lr_scale == "norm":
        return cfg.lr * h.norm(dim=1, keepdim=True) / h.shape[1] ** 0.5
    return torch.full((h.shape[0], 1), cfg.lr)


def release(state: ZState, waiting: Tensor, starts_from: Tensor, cfg: ZCfg) -> Tensor:
    """Start every waiting member whose anchor is through its shared steps (met the stop rule, or took
    `cfg.shared_steps`): from `cfg.warm_scale` × the anchor's δ as it is now, with the anchor's Adam
    moments when `cfg.carry_adam`, else fresh ones; no steps taken, not done. Returns the members still
    waiting."""
    through = state.done | (state.steps >= cfg.shared_steps)
    ready = waiting & through[starts_from]
    members = torch.nonzero(ready).squeeze(1)
    if len(members):
        start = state.rows(starts_from[members])
        start.delta.mul_(cfg.warm_scale)
        start.steps.zero_(), start.done.zero_()
        if not cfg.carry_adam:
            start.m.zero_(), start.v.zero_(), start.t.zero_()
        state.put(members, start)
    return waiting & ~ready


def optimise(
    problem: ZProblem,
    adapter: ModelAdapter,
    layer: int,
    state: ZState,
    starts_from: Tensor,
    cfg: ZCfg,
    stopped: FactLosses | None = None,
) -> ZState:
    """ECE's two steps for every fact of a batch in one batched loop of Adam steps, in place.

    `starts_from[i]` is the fact whose δ fact i starts from: itself for an anchor (and for a fact in
    no group), its anchor for a member. The step limits are the two phases' (see the module doc):
    an anchor takes up to shared_steps + instance_steps uninterrupted steps from `state`; a member
    waits, in no pass, until its anchor is done or has taken shared_steps steps (`release`), then
    takes up to instance_steps steps. A member's descent is therefore the one it had when the
    instance phase ran after the whole shared phase; it only starts sooner, alongside the other
    anchors, so its rows fill passes that run anyway.

    At each pass the facts that meet the stop rule are frozen (no update, as in MEMIT) and leave:
    a pass runs only the rows of the facts still optimising, so a batch costs the sum of its facts'
    steps (plus the pass in which a stopped fact met the rule), not its slowest fact's steps times
    its size.

    With `cfg.facts_per_pass` = N > 0 a pass runs its facts N at a time (one forward/backward each):
    the facts' losses are independent, so every fact's descent is the same, and the activations kept
    for the backward are those of N facts, not the batch's (the references run one fact at a time;
    on a 7B model a batch of 100 at once would not fit).

    `stopped` (n,) receives the losses at which each fact met the stop rule (those of its final δ).
    """
    rule, lr = StopRule.of(cfg), row_lr(problem.h, cfg)
    n = problem.n_facts
    own = starts_from == torch.arange(n)
    limit = torch.where(own, cfg.shared_steps + cfg.instance_steps, cfg.instance_steps)
    waiting = ~own
    subsets: dict[tuple[int, ...], ZProblem] = {}  # re-subset only when a chunk's facts change
    with tqdm(desc="z", unit="pass", leave=False) as bar:
        while True:
            waiting = release(state, waiting, starts_from, cfg)
            active = torch.nonzero(~waiting & ~state.done & (state.steps < limit)).squeeze(1)
            if len(active) == 0:  # every anchor is through, so nobody waits either
                return state
            chunks = {
                tuple(c.tolist()): c for c in (active.split(cfg.facts_per_pass) if cfg.facts_per_pass else [active])
            }
            subsets = {key: subsets[key] if key in subsets else problem.subset(c) for key, c in chunks.items()}
            for key, chunk in chunks.items():
                _step(subsets[key], adapter, layer, state, chunk, lr, rule, cfg, stopped)
            bar.update()


def _step(
    sub: ZProblem,
    adapter: ModelAdapter,
    layer: int,
    state: ZState,
    rows: Tensor,
    lr: Tensor,
    rule: StopRule,
    cfg: ZCfg,
    stopped: FactLosses | None = None,
) -> None:
    """One forward/backward of the facts `rows` (`sub` = the problem restricted to them, in that order):
    freeze those that meet the stop rule (their losses into `stopped`), one Adam step and the clamp for
    the others."""
    delta = state.delta[rows].requires_grad_(True)
    losses = fact_losses(sub, adapter, layer, delta, cfg)
    met = rule.met(losses)
    state.done[rows[met]] = True
    if stopped is not None:
        for into, got in zip((stopped.total, stopped.nll, stopped.kl), (losses.total, losses.nll, losses.kl)):
            into[rows[met]] = got.detach()[met]
    go = torch.nonzero(~met).squeeze(1)
    state.steps[rows[go]] += 1
    (grad,) = torch.autograd.grad(losses.total[go].sum(), delta)
    rows = rows[go]
    state.adam(rows, grad[go], lr[rows])
    state.delta[rows] = clamp_rows(state.delta[rows], sub.h[go], cfg.clamp_norm_factor)


def warm_start_groups(
    mode: str, cluster_labels: Tensor, cluster_anchors: Tensor, targets: list[str]
) -> tuple[Tensor, Tensor]:
    """(labels, anchors) for two_step_z: which fact's δ each fact starts from.

    `cluster`: ECE's neuron clusters as they are. `object`: facts with the same target_new (δ encodes
    mostly the new object, so it transfers between them; reports/z_design.md). `cluster_object`: a
    neuron cluster split by target_new, its anchor kept where it belongs. `none`: every fact alone.
    A keyed group's anchor is the cluster's anchor when it is in the group, else its first fact.
    """
    n = len(targets)
    if mode == "cluster":
        return cluster_labels, cluster_anchors
    if mode == "none":
        return torch.arange(n), torch.arange(n)
    keys = [targets[i] if mode == "object" else (int(cluster_labels[i]), targets[i]) for i in range(n)]
    preferred = {keys[int(a)]: int(a) for a in cluster_anchors} if mode == "cluster_object" else {}
    group: dict[object, int] = {}
    anchors: list[int] = []
    for i, key in enumerate(keys):
        if key not in group:
            group[key] = len(anchors)
            anchors.append(preferred.get(key, i))
    return torch.tensor([group[k] for k in keys]), torch.tensor(anchors)


@dataclass
class ZResult:
    z: Tensor  # (n, d) = h + δ
    delta: Tensor
    h: Tensor
    losses: FactLosses  # at the final δ
    steps: Tensor  # (n,) gradient steps taken for each fact (an anchor's include its shared steps)


def two_step_z(
    problem: ZProblem,
    adapter: ModelAdapter,
    layer: int,
    labels: Tensor,
    anchors: Tensor,
    cfg: ZCfg,
    start: Tensor | None = None,
) -> ZResult:
    """z of every fact in one loop (`optimise`), each anchor's descent from its row of `start` (n, d)
    (δ = 0 without; `EarlierObjects.starts` gives it, already scaled).

    `labels[i]` is fact i's group and `anchors[c]` the fact index of group c's anchor. MEMIT is the
    case labels = anchors = arange(n), start = None: one uninterrupted descent per fact from zero.
    A member's row of `start` is not read: it starts from its anchor's δ.
    """
    state = ZState.zeros(*problem.h.shape)
    if start is not None:
        state.delta = start.to(state.delta).clone()
    n = problem.n_facts
    losses = FactLosses(torch.zeros(n), torch.zeros(n), torch.zeros(n))
    state = optimise(problem, adapter, layer, state, anchors[labels], cfg, losses)
    # A fact that met the stop rule was frozen with the losses it met it at; the others (through their
    # steps) still need those of their last δ: one more forward of those facts only.
    rest = torch.nonzero(~state.done).squeeze(1)
    with torch.no_grad():
        for chunk in rest.split(cfg.facts_per_pass) if cfg.facts_per_pass else [rest]:
            if len(chunk):
                got = fact_losses(problem.subset(chunk), adapter, layer, state.delta[chunk], cfg)
                for into, part in zip((losses.total, losses.nll, losses.kl), (got.total, got.nll, got.kl)):
                    into[chunk] = part
    return ZResult(problem.h + state.delta, state.delta, problem.h, losses, state.steps)


def compute_z(
    adapter: ModelAdapter,
    tok: PreTrainedTokenizerBase,
    facts: list[Fact],
    layer: int,
    templates: list[str],
    labels: Tensor,
    anchors: Tensor,
    cfg: ZCfg,
    start: Tensor | None = None,
) -> ZResult:
    """z of a batch of facts: the problem built once and both phases batched (with `cfg.facts_per_pass`
    > 0, each pass runs that many facts per forward/backward, which bounds memory and gives the same
    descent). `start`: the anchors' initial δ (`EarlierObjects.starts`)."""
    problem = build_problem(adapter, tok, facts, layer, templates)
    return two_step_z(problem, adapter, layer, labels, anchors, cfg, start)


def z_groups(p: Params, method: Method, cluster_rows: list[dict[str, Any]], batch: list[Fact]) -> tuple[Tensor, Tensor]:
    """(labels, anchors) of z's warm start for one batch, from its cluster rows (ece.editing.zvec.warm_start_groups)."""
    assert [r["id"] for r in cluster_rows] == [f.id for f in batch], "clusters are out of date; rerun dvc repro"
    position = {r["id"]: j for j, r in enumerate(cluster_rows)}
    anchors = [
        position[r["id"]] for r in sorted((r for r in cluster_rows if r["is_anchor"]), key=lambda r: r["cluster"])
    ]
    return warm_start_groups(
        p.z.warm_start if method.clusters else "none",
        torch.tensor([r["cluster"] for r in cluster_rows]),
        torch.tensor(anchors),
        [f.target_new for f in batch],
    )


def window_cluster_rows(per_batch: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """The cluster rows of a window's batches (z.window_batches) as one z batch's: each batch's cluster
    numbers shifted past the earlier batches' (clusters never span batches; grouping by object does)."""
    rows, shift = [], 0
    for batch in per_batch:
        rows += [{**r, "cluster": r["cluster"] + shift} for r in batch]
        shift += 1 + max((r["cluster"] for r in batch), default=-1)
    return rows


def window_shares(sizes: list[int], steps: list[int], seconds: float) -> list[tuple[slice, float]]:
    """Each batch of a z window (`sizes`: its batches' fact counts, in order): its rows of the window's
    z and its share of the window's z `seconds`, in proportion to its z row-steps (`steps`, per fact) —
    the window's passes hold all its batches' facts at once, so only steps say which batch cost what."""
    total, shares, first = sum(steps), [], 0
    for n in sizes:
        cut = slice(first, first + n)
        shares.append((cut, seconds * (sum(steps[cut]) / total if total else 1 / len(sizes))))
        first += n
    return shares


def z_adapter(adapter: ModelAdapter, dtype: str) -> ModelAdapter:
    """The adapter z's descent runs on: the model's own, or a copy in `z.dtype`.

    Only δ comes from the copy; the weights, keys and the update stay in the model's precision. That is
    the point of a bfloat16 copy of a float32 model: on CPUs with bfloat16 matrix units (AMX) its
    matmuls are several times faster, while holding the weights in bfloat16 would round most of an
    update's ΔW away (ΔW's entries are far below W's bfloat16 spacing).
    """
    if dtype == "model" or DTYPES[dtype] == adapter.dtype:
        return adapter
    if adapter.device.type == "cpu" and DTYPES[dtype] == torch.bfloat16 and not native_cpu_bfloat16():
        warnings.warn(
            "z.dtype bfloat16 on a CPU without bfloat16 matrix instructions (AVX512-BF16 / AMX) runs, "
            "emulated and slower than float32: set z.dtype: model on this machine",
            stacklevel=2,
        )
    return adapter.cast(DTYPES[dtype])


def native_cpu_bfloat16() -> bool:
    """Whether this CPU multiplies bfloat16 matrices in hardware (torch's own probe; private, hence guarded)."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def batch_z(
    wb: Workbench,
    p: Params,
    method: Method,
    batch: list[Fact],
    labels: Tensor,
    anchors: Tensor,
    start: Tensor | None = None,
) -> ZResult:
    """z of one batch at the method's last edited layer, computed on that layer's device and returned on the
    CPU. Every tensor z's code creates goes to that device through torch's default-device context, so
    no function here names a device (on the CPU the context changes nothing). `start`: the anchors'
    initial δ (`EarlierObjects.starts`; None: zero)."""
    layer = method.layers[-1]
    device = wb.adapter.layer_device(layer)
    adapter = z_adapter(wb.adapter, p.z.dtype)
    with torch.device(device):
        start = start.to(device) if start is not None else None
        res = compute_z(adapter, wb.tok, batch, layer, wb.templates, labels.to(device), anchors.to(device), p.z, start)
        if adapter is not wb.adapter:  # z = h + δ with the h that keys and the update see
            _, h = keys_and_hidden(wb.adapter, wb.tok, batch, wb.templates[:1], [], layer)
            res = replace(res, z=h + res.delta, h=h)
    losses = FactLosses(res.losses.total.cpu(), res.losses.nll.cpu(), res.losses.kl.cpu())
    return ZResult(res.z.cpu(), res.delta.cpu(), res.h.cpu(), losses, res.steps.cpu())


def z_rows(
    res: ZResult, batch: list[Fact], anchors_of: Tensor, earlier: Tensor, predicted: Tensor
) -> list[dict[str, Any]]:
    """Per fact of a batch: z's final losses, ‖δ‖, steps, the fact its descent started from, how many
    earlier batches' facts that anchor started from the mean δ of (`earlier`, (n,); 0: none) and how many
    the predictor of its start was fitted on (`predicted`, (n,); 0: not predicted)."""
    return [
        {
            "loss": float(res.losses.total[j]),
            "nll": float(res.losses.nll[j]),
            "kl": float(res.losses.kl[j]),
            "delta_norm": float(res.delta[j].norm()),
            "steps": int(res.steps[j]),
            "anchor": batch[int(anchors_of[j])].id,
            "earlier": int(earlier[j]),
            "predicted": int(predicted[j]),
        }
        for j in range(len(batch))
    ]


class DeltaPredictor:
    """Ridge regression from a fact's new-object features (n, f) to its final δ (n, d), fitted on every
    fact added so far (`z.predict_cold`).

    Where no earlier fact had a fact's new object there is no δ to borrow, but δ still encodes mostly
    the object, and objects whose token embeddings are close get close δ, so the prediction from the
    object's first-token input embedding points part of the way (cosine ~0.2 with the fact's own δ
    after a fit on 100-1000 facts, and fewer z steps from it: reports/z_predict.md). The sums XᵀX and
    XᵀY are kept in float64, so a fit costs one f × f solve however many facts it has seen.

    A prediction is rough (that cosine) and shrunk by the ridge, so the start nearest a fact's δ along it
    is s·p with s = Σ⟨p, δ⟩ / Σ‖p‖², which the predictor measures on held-out facts (predicted before it
    was fitted on them; `scale`, `z.predict_calibrate`; the precompute_z stage prints it). On zsRE a
    start at the whole prediction cost 0.13 efficacy, at s·p 0.03 (reports/scale.md), and the cost
    falls on every fact alike, through the other batches' updates: the prediction is mostly the
    direction all facts' δ share, which the predicted δ keep and the updates pile up
    (reports/predict_cost.md).
    A held-out fact must not have started from a prediction itself: its final δ keeps part of its
    start, which would pull s towards the gain it started with.
    With `center` (`z.predict_center`) a prediction loses its component along the fitted facts' mean δ.
    On CounterFact's new objects what is left still saves two thirds of the steps, and the final δ keep
    no more of the shared direction than from zero (reports/z_predict_parts.md); on zsRE, whose
    object-specific part is weaker, it saves 6 % and keeps perplexity but still costs 0.04 efficacy
    (reports/scale.md, row ece-center), so it is off by default.
    """

    def __init__(self, ridge: float, min_facts: int, center: bool = False) -> None:
        self.ridge = ridge
        self.min_facts = min_facts
        self.center = center
        self.n = 0
        self._xx: Tensor | None = None
        self._xy: Tensor | None = None
        self._y: Tensor | None = None  # Σ δ: the fitted facts' mean δ is the direction `center` removes
        self._pd = 0.0  # Σ ⟨p, δ⟩ over facts predicted before the fit saw them
        self._pp = 0.0  # Σ ‖p‖² over the same facts

    def add(self, x: Tensor, delta: Tensor, held_out: Tensor | None = None) -> None:
        """Add facts' features (n, f) and final δ (n, d) to the fit; the rows of `held_out` (n,) bool first
        go to `scale`."""
        if held_out is not None and held_out.any():
            p = self.predict(x[held_out])
            if p is not None:
                self._pd += float((p.double() * delta[held_out].double()).sum())
                self._pp += float(p.double().square().sum())
        x, y = x.double(), delta.double()
        xx, xy = x.T @ x, x.T @ y
        self._xx = xx if self._xx is None else self._xx + xx
        self._xy = xy if self._xy is None else self._xy + xy
        self._y = y.sum(0) if self._y is None else self._y + y.sum(0)
        self.n += len(x)

    def predict(self, x: Tensor) -> Tensor | None:
        """argmin_A ‖XA − Y‖² + ridge·‖A‖² applied to `x` (n, f), with `center` without its component along
        the fitted facts' mean δ; None before `min_facts` facts."""
        if self._xx is None or self._xy is None or self._y is None or self.n < max(self.min_facts, 1):
            return None
        eye = torch.eye(len(self._xx), dtype=self._xx.dtype)
        p = x.double() @ torch.linalg.solve(self._xx + self.ridge * eye, self._xy)
        if self.center and self._y.norm() > 0:
            unit = self._y / self._y.norm()
            p = p - (p @ unit)[:, None] * unit[None]
        return p.float()

    def scale(self) -> float | None:
        """The least-squares scale of held-out predictions onto their facts' δ, at least 0 (a fit that
        points away from δ predicts nothing); None before any held-out fact was predicted."""
        return max(self._pd / self._pp, 0.0) if self._pp > 0 else None


def object_embeddings(adapter: ModelAdapter, tok: PreTrainedTokenizerBase, facts: list[Fact]) -> Tensor:
    """Each fact's new object as features for `DeltaPredictor`: the input embedding of its target's first
    token, unit-normed (models scale embeddings differently; the direction is what names the word)."""
    emb = adapter.input_embeddings(torch.tensor([target_ids(tok, f.target_new)[0] for f in facts])).float().cpu()
    return emb / emb.norm(dim=1, keepdim=True).clamp_min(1e-12)


@dataclass
class ColdStarts:
    """`z.predict_cold`: how an anchor whose new object no earlier fact had gets a start — `gain` × the
    `predictor`'s δ for the object's features (`embed`), times the predictor's measured `scale` when
    `calibrate` (no prediction until it has one)."""

    predictor: DeltaPredictor
    embed: Callable[[list[Fact]], Tensor]
    gain: float
    calibrate: bool = False
    _features: dict[str, Tensor] = field(default_factory=dict, repr=False)

    def features(self, facts: list[Fact]) -> Tensor:
        """`embed` of the facts' new objects, each object's computed once: a batch's cold anchors are
        embedded for their prediction and the whole batch again for the fit (`EarlierObjects.add`)."""
        new = list({f.target_new: f for f in facts if f.target_new not in self._features}.values())
        if new:
            self._features.update(zip((f.target_new for f in new), self.embed(new)))
        return torch.stack([self._features[f.target_new] for f in facts])

    def gain_now(self) -> float | None:
        """The factor on the prediction now; None: do not predict yet."""
        if not self.calibrate:
            return self.gain
        s = self.predictor.scale()
        return None if s is None else self.gain * s


class Starts(NamedTuple):
    """Each anchor's initial δ (n, d), or None when every start is zero, and per fact where it came from:
    how many earlier facts with its object it is the mean δ of (`earlier`), and how many earlier facts
    the predictor that gave it was fitted on (`predicted`); both 0 for a start from zero or a member."""

    delta: Tensor | None
    earlier: Tensor
    predicted: Tensor


class WindowStart(NamedTuple):
    """Where one z window's descent begins: its warm-start groups (`labels`, `anchors`) and each anchor's
    initial δ (`starts`)."""

    labels: Tensor
    anchors: Tensor
    starts: Starts


def window_start(
    p: Params, method: Method, history: EarlierObjects, cluster_rows: list[dict[str, Any]], facts: list[Fact], d: int
) -> WindowStart:
    """The groups of a window's facts (its clusters' warm-start groups, `z_groups`), regrouped and started
    from what earlier windows' facts found (`history`). The one place that sequence is spelled out: the
    precompute_z stage and the in-memory plan (ece.api.plan) both begin each window here."""
    labels, anchors = z_groups(p, method, cluster_rows, facts)
    labels, anchors = history.regroup(facts, labels, anchors)
    return WindowStart(labels, anchors, history.starts(facts, labels, anchors, d))


class EarlierObjects:
    """The final δ of every fact of the batches so far, summed by new object (`z.warm_from_earlier`).

    δ encodes mostly the new object: started from the mean δ of other facts with the same target_new,
    a fact needs a few steps instead of ~10 (reports/z_design.md). Within a batch, ECE's members get
    that from their anchor; this carries it across batches, where most of a long run's facts find
    their object (of the first 2000 CounterFact facts in batches of 100, 1124 have a target_new that
    only an earlier batch edited). It is sound because every batch's z is computed on the original
    model (precompute_z), so all δ live in the same space.

    Mode `anchors`: only a group's anchor takes it; its members wait until the anchor stops and start
    from its δ. Mode `all` (`regroup`): every fact whose object an earlier batch edited takes it and
    starts at once, in a group of its own — it need not wait for an anchor that starts from the same
    place, so the batch's first passes hold it instead of its last ones. `none`: every start is zero.
    A borrowed mean enters at `scale` × itself (`z.warm_scale`). With `cold` (`z.predict_cold`), an
    anchor whose object no earlier fact had starts from a predicted δ instead of zero, once the
    predictor has seen enough facts; the predictor is fitted on every fact `add` records.
    """

    def __init__(self, mode: str, scale: float = 1.0, cold: ColdStarts | None = None) -> None:
        self.mode = mode
        self.enabled = mode != "none"
        self.scale = scale
        self.cold = cold if self.enabled else None
        self._predicted_any = False  # once a start was predicted, no later δ is a held-out measure of the fit
        self._sum: dict[str, Tensor] = {}
        self._count: dict[str, int] = {}

    @classmethod
    def of(cls, p: Params, method: Method, wb: Workbench) -> EarlierObjects:
        """An empty history, in use for ECE with z.warm_from_earlier (otherwise every start is zero); with
        z.predict_cold > 0, cold anchors start from a predicted δ."""
        z = p.z
        mode = z.warm_from_earlier if method.clusters else "none"
        if z.predict_cold <= 0:
            return cls(mode, z.warm_scale)
        predictor = DeltaPredictor(z.predict_ridge, z.predict_min_facts, z.predict_center)

        def embed(facts: list[Fact]) -> Tensor:
            return object_embeddings(wb.adapter, wb.tok, facts)

        return cls(mode, z.warm_scale, ColdStarts(predictor, embed, z.predict_cold, z.predict_calibrate))

    def regroup(self, batch: list[Fact], labels: Tensor, anchors: Tensor) -> tuple[Tensor, Tensor]:
        """(labels, anchors) with, in mode `all`, every fact whose target_new an earlier batch edited taken
        out of its group as an anchor of its own (groups numbered by anchor position); otherwise, and when
        no fact has an earlier object, the groups as they are. A member whose object is new keeps its
        anchor, whatever that anchor's object."""
        known = torch.tensor([f.target_new in self._count for f in batch], dtype=torch.bool)
        if self.mode != "all" or not known.any():
            return labels, anchors
        start_of = anchors[labels].clone()
        start_of[known] = torch.nonzero(known).squeeze(1)
        new_anchors = torch.nonzero(start_of == torch.arange(len(batch))).squeeze(1)
        group = torch.empty(len(batch), dtype=torch.long)
        group[new_anchors] = torch.arange(len(new_anchors))
        return group[start_of], new_anchors

    def starts(self, batch: list[Fact], labels: Tensor, anchors: Tensor, d: int) -> Starts:
        """Each anchor's initial δ — `scale` × the mean δ of the earlier facts with its target_new; for an
        anchor whose target_new none had, `gain` × its predicted δ once the predictor has seen enough
        facts, else zero — and where each came from (`Starts`)."""
        fitted = torch.zeros(len(batch), dtype=torch.long)  # its own tensor: the z file stores each field
        if not self.enabled:
            return Starts(None, torch.zeros_like(fitted), fitted)
        own = anchors[labels] == torch.arange(len(batch))
        counts = torch.tensor([self._count.get(f.target_new, 0) if own[i] else 0 for i, f in enumerate(batch)])
        cold = torch.nonzero(own & (counts == 0)).squeeze(1).tolist()
        predicted, gain = None, self.cold.gain_now() if self.cold is not None else None
        if cold and self.cold is not None and gain:
            guess = self.cold.predictor.predict(self.cold.features([batch[i] for i in cold]))
            if guess is not None:
                predicted = gain * guess
                fitted[cold] = self.cold.predictor.n
        if not counts.any() and predicted is None:
            return Starts(None, counts, fitted)
        start = torch.zeros(len(batch), d)
        for i in torch.nonzero(counts).squeeze(1).tolist():
            target = batch[i].target_new
            start[i] = self.scale * (self._sum[target] / self._count[target]).float()
        if predicted is not None:
            start[cold] = predicted
            self._predicted_any = True
        return Starts(start, counts, fitted)

    def add(self, batch: list[Fact], delta: Tensor) -> None:
        """Record a finished batch's final δ (n, d)."""
        if not self.enabled:
            return
        if self.cold is not None:
            # held out: facts with an object the fit has not seen (as those it predicts for), all from zero
            # or from a batch-mate that was (a fact with a seen object is not held out)
            unseen = [f.target_new not in self._count and not self._predicted_any for f in batch]
            self.cold.predictor.add(self.cold.features(batch), delta, torch.tensor(unseen, dtype=torch.bool))
        for f, row in zip(batch, delta.double()):
            self._sum[f.target_new] = self._sum.get(f.target_new, torch.zeros_like(row)) + row
            self._count[f.target_new] = self._count.get(f.target_new, 0) + 1
