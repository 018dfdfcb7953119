"""Target hidden states z: MEMIT's objective, optimised in ECE's two steps, batched over facts.

Each fact i gets its own row δ_i added at its subject's last token after the last edited layer.
The loss is a sum of per-fact terms, so one batched forward/backward gives every row exactly the
gradient it would get alone, and a row-wise Adam makes the batched run equal to a per-fact loop.

Two steps (ECE): `shared_steps` on each cluster's anchor, then `instance_steps` on every fact starting
from its anchor's δ and Adam state. A singleton cluster is therefore plain MEMIT z with
shared_steps + instance_steps uninterrupted Adam steps.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase

from ece.adapter import KV, ModelAdapter
from ece.config import ZCfg
from ece.keys import Fact, at_positions, encode, templated

KL_TEMPLATE = "{} is a"
BETAS = (0.9, 0.999)
EPS = 1e-8


def target_ids(tok: PreTrainedTokenizerBase, target: str) -> list[int]:
    """Token ids of a target continuation, with the leading space a continuation has in running text."""
    return tok((target if target.startswith(" ") else " " + target), add_special_tokens=False).input_ids


@dataclass
class ZProblem:
    """Everything the optimisation needs, computed once.

    Activations below the edit layer are fixed, and so is everything before each row's subject in
    the layers above (attention is causal): the blocks above keep those tokens' keys and values
    (`prefix`) and every step runs only the tokens from the subject on, about a fifth of the rows'
    tokens for MEMIT's prompts. Token axes below are therefore "from the subject on": index 0 is
    the subject's last token, where δ is added.
    """

    hidden: Tensor  # (R, S, d) residual stream after the edit layer from the subject on
    position_ids: Tensor  # (R, S) their positions in the full row
    attn: Tensor  # (R, 1, S, P + S) additive mask over the prefix and the row's own tokens
    prefix: KV  # keys/values of the first P tokens at every block above the edit layer
    row_fact: Tensor  # (R,) which fact a row belongs to
    labels: Tensor  # (R, S) token that logits at s must predict, -100 where no NLL
    kl_rows: Tensor  # (n,) row index of each fact's KL prompt
    kl_last: Tensor  # (n,) last token of that prompt
    kl_ref: Tensor  # (n, V) log-probs of the unedited model there
    h: Tensor  # (n, d) residual at the subject on the bare prompt

    @property
    def n_facts(self) -> int:
        return self.h.shape[0]

    def subset(self, facts: Tensor) -> "ZProblem":
        """The problem restricted to `facts` (renumbered 0..len-1 in the given order)."""
        remap = torch.full((self.n_facts,), -1, dtype=torch.long)
        remap[facts] = torch.arange(len(facts))
        rows = torch.nonzero(remap[self.row_fact] >= 0).squeeze(1)
        new_index = torch.full((self.hidden.shape[0],), -1, dtype=torch.long)
        new_index[rows] = torch.arange(len(rows))
        return replace(
            self, hidden=self.hidden[rows], position_ids=self.position_ids[rows], attn=self.attn[rows],
            prefix={l: (k[rows], v[rows]) for l, (k, v) in self.prefix.items()},
            row_fact=remap[self.row_fact[rows]], labels=self.labels[rows],
            kl_rows=new_index[self.kl_rows[facts]], kl_last=self.kl_last[facts],
            kl_ref=self.kl_ref[facts], h=self.h[facts],
        )


def split_at_subject(mask: Tensor, pos: Tensor) -> tuple[int, Tensor, Tensor, Tensor]:
    """Layout of the "from the subject on" tokens of right-padded rows.

    Returns the prefix length P (longest row prefix), the (R, S) index of each row's tokens from
    `pos` on in the full rows (clamped inside the row for padding), which of them are real, and the
    additive attention mask: token s sees prefix tokens before its row's subject and its own tokens
    up to s. Every query sees at least its own row's first token, so no softmax row is empty.
    """
    lengths = mask.sum(1)
    width = int((lengths - pos).max())
    n_prefix = int(pos.max())
    s = torch.arange(width)
    index = (pos[:, None] + s).clamp(max=mask.shape[1] - 1)
    real = s[None, :] < (lengths - pos)[:, None]
    sees_prefix = torch.arange(n_prefix)[None, None, :] < pos[:, None, None]  # (R, 1, P)
    sees_own = (s[None, :] <= s[:, None])[None] & real[:, None, :]  # (R, S, S)
    allowed = torch.cat([sees_prefix.expand(-1, width, -1), sees_own], dim=2)
    attn = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    return n_prefix, index, real, attn[:, None]


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
    _, outs = adapter.trace(enc.input_ids, enc.attention_mask, out_layers=[layer])
    hidden = outs[layer]
    kl_rows = torch.arange(n * t, n * t + n)
    kl_last = enc.lengths[kl_rows] - 1
    final = adapter.final_hidden_from(layer, hidden[kl_rows], enc.attention_mask[kl_rows])
    kl_ref = F.log_softmax(adapter.lm_head(at_positions(final, kl_last)), dim=-1)
    pos = enc.subject_pos
    h = at_positions(hidden, pos)[: n * t].reshape(n, t, -1)[:, 0]
    n_prefix, index, real, attn = split_at_subject(enc.attention_mask, pos)
    rows = torch.arange(len(pos))[:, None]
    labels_from_subject = labels[rows, index].masked_fill(~real, -100)
    assert (labels_from_subject >= 0).sum() == (labels >= 0).sum(), "a target token lies before its subject"
    return ZProblem(
        hidden=hidden[rows, index], position_ids=index, attn=attn,
        prefix=adapter.prefix_kv(layer, hidden[:, :n_prefix], enc.attention_mask[:, :n_prefix]) if n_prefix else {},
        row_fact=row_fact, labels=labels_from_subject,
        kl_rows=kl_rows, kl_last=kl_last - pos[kl_rows], kl_ref=kl_ref, h=h,
    )


@dataclass
class FactLosses:
    total: Tensor  # (n,)
    nll: Tensor
    kl: Tensor


def fact_losses(problem: ZProblem, adapter: ModelAdapter, layer: int, delta: Tensor, cfg: ZCfg) -> FactLosses:
    """MEMIT's loss per fact: mean target NLL over its prompts + kl_factor·KL + weight decay."""
    hidden = torch.cat([problem.hidden[:, :1] + delta[problem.row_fact, None], problem.hidden[:, 1:]], dim=1)
    final = adapter.final_hidden_from(layer, hidden, problem.attn, problem.position_ids, problem.prefix)
    n = problem.n_facts
    # NLL only where a target token is predicted: the LM head is the costliest matmul.
    r, t = torch.nonzero(problem.labels >= 0, as_tuple=True)
    logp = F.log_softmax(adapter.lm_head(final[r, t]), dim=-1)
    tok_nll = -logp.gather(1, problem.labels[r, t].unsqueeze(1)).squeeze(1)
    n_rows = hidden.shape[0]
    row_nll = torch.zeros(n_rows).index_add(0, r, tok_nll)
    row_len = torch.zeros(n_rows).index_add(0, r, torch.ones_like(tok_nll))
    has_target = row_len > 0
    per_row = row_nll[has_target] / row_len[has_target]
    owner = problem.row_fact[has_target]
    nll = torch.zeros(n).index_add(0, owner, per_row) / torch.zeros(n).index_add(0, owner, torch.ones_like(per_row))
    cur = F.log_softmax(adapter.lm_head(at_positions(final[problem.kl_rows], problem.kl_last)), dim=-1)
    kl = (problem.kl_ref.exp() * (problem.kl_ref - cur)).sum(1)
    decay = cfg.weight_decay * delta.norm(dim=1) / problem.h.norm(dim=1) ** 2
    return FactLosses(nll + cfg.kl_factor * kl + decay, nll, kl)


@dataclass
class Adam:
    """Row-wise Adam state, so rows can be gathered (anchor → members) between the two steps."""

    m: Tensor
    v: Tensor
    step: int = 0

    @classmethod
    def zeros(cls, like: Tensor) -> "Adam":
        return cls(torch.zeros_like(like), torch.zeros_like(like))

    def gather(self, index: Tensor) -> "Adam":
        return Adam(self.m[index], self.v[index], self.step)

    def update(self, param: Tensor, grad: Tensor, lr: float) -> Tensor:
        b1, b2 = BETAS
        self.step += 1
        self.m = b1 * self.m + (1 - b1) * grad
        self.v = b2 * self.v + (1 - b2) * grad * grad
        m_hat = self.m / (1 - b1**self.step)
        v_hat = self.v / (1 - b2**self.step)
        return param - lr * m_hat / (v_hat.sqrt() + EPS)


def clamp_rows(delta: Tensor, h: Tensor, factor: float) -> Tensor:
    """Project each δ_i into the ball of radius factor·‖h_i‖ (MEMIT's norm constraint)."""
    limit = factor * h.norm(dim=1, keepdim=True)
    norm = delta.norm(dim=1, keepdim=True)
    return torch.where(norm > limit, delta * limit / norm.clamp_min(1e-12), delta)


def optimise(
    problem: ZProblem, adapter: ModelAdapter, layer: int, delta: Tensor, adam: Adam, steps: int, cfg: ZCfg,
    desc: str = "z",
) -> tuple[Tensor, Adam]:
    for _ in tqdm(range(steps), desc=desc, leave=False, disable=steps == 0):
        delta = delta.detach().requires_grad_(True)
        loss = fact_losses(problem, adapter, layer, delta, cfg).total.sum()
        (grad,) = torch.autograd.grad(loss, delta)
        delta = clamp_rows(adam.update(delta.detach(), grad, cfg.lr), problem.h, cfg.clamp_norm_factor)
    return delta.detach(), adam


@dataclass
class ZResult:
    z: Tensor  # (n, d) = h + δ
    delta: Tensor
    h: Tensor
    losses: FactLosses  # after the last step


def two_step_z(
    problem: ZProblem, adapter: ModelAdapter, layer: int, labels: Tensor, anchors: Tensor, cfg: ZCfg
) -> ZResult:
    """Shared phase on the anchors (batched), then the instance phase on all facts (batched).

    `labels[i]` is fact i's cluster and `anchors[c]` the fact index of cluster c's anchor. MEMIT is
    the case labels = anchors = arange(n).
    """
    d = problem.h.shape[1]
    anchor_problem = problem.subset(anchors)
    shared = torch.zeros(len(anchors), d)
    shared, adam = optimise(anchor_problem, adapter, layer, shared, Adam.zeros(shared), cfg.shared_steps, cfg, "z shared")
    delta, _ = optimise(
        problem, adapter, layer, shared[labels], adam.gather(labels), cfg.instance_steps, cfg, "z instance"
    )
    with torch.no_grad():
        losses = fact_losses(problem, adapter, layer, delta, cfg)
    return ZResult(problem.h + delta, delta, problem.h, losses)
