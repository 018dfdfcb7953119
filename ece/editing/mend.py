"""MEND (Mitchell et al., ICLR 2022): a trained network turns the fine-tuning gradient of an edit into a
weight change that carries over to paraphrases and leaves unrelated prompts alone.

For W_out (d × f) the gradient of a loss over tokens t is Σ_t δ_t u_tᵀ: u_t the layer's input, δ_t the
loss's gradient with respect to the layer's output. MEND never forms that d × f matrix; it transforms
each token's pair (u_t, δ_t), normalised by running statistics, with an MLP g whose two layers are
low-rank, residual and shared by the edited layers (one weight shape), with a scale s and shift o per
edited layer l (the paper's eq. 3-4 in the `init: id` form of the authors' release):

    z = [(u − μ_u)/(σ_u + ε) ; (δ − μ_δ)/(σ_δ + ε)]
    h = z + relu(s¹_l ⊙ (U₁V₁z + b₁) + o¹_l)
    [ũ ; δ̃] = h + relu(s²_l ⊙ (U₂V₂h + b₂) + o²_l)
    W̃_l = W_l − α_l Σ_t δ̃_t ũ_tᵀ          (α_l: a learned step size per layer)

U starts at zero, so g starts as the identity and the first edits are normalised gradient steps.
Training edits one training record's prompt, scores the edited weights on its paraphrase (target NLL,
weight c_edit) and on an unrelated prompt (KL from the unedited model's prediction there, weight
c_loc), and updates g and α with Adam through the edit (u and δ themselves are constants, as in the
release). The residual stream below the first edited layer never changes (only the layers above are
edited), so each record's three texts run the blocks below once and every later use of the record
(each step's edit and scores, each held-out evaluation) runs only the edited blocks and the head.

A batch of facts is edited with the sum of the facts' mean target NLLs, so that each fact's δ has the
scale of a single edit, the one MEND is trained on (the release's mean over the batch would shrink
each fact's edit by the batch size).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from ece.config import Params
from ece.data.editor_data import TrainingRecord
from ece.data.facts import Fact
from ece.editing.editor_io import Trained, TrainingCheckpoint, TrainingRun
from ece.model.adapter import ModelAdapter
from ece.model.prompts import document_start, right_padded, target_ids

NORM_EPS = 1e-7  # added to the running standard deviation (the release's value)
Log = Callable[[str], None]


@dataclass
class Labelled:
    """Texts with their continuations as the edited blocks see them: the residual stream below the first
    edited layer, and per position the token it must predict (-100: no loss there)."""

    hidden: Tensor  # (B, T, d)
    mask: Tensor  # (B, T)
    labels: Tensor  # (B, T)


def labelled(
    adapter: ModelAdapter, tok: PreTrainedTokenizerBase, below: int, texts: list[str], continuations: list[str]
) -> Labelled:
    """Each text after the document start, followed by its continuation, run up to block `below`."""
    start = document_start(tok)
    rows, spans = [], []
    for text, continuation in zip(texts, continuations):
        head, tail = start + list(tok(text).input_ids), target_ids(tok, continuation)
        rows.append(head + tail)
        spans.append((len(head), len(tail)))
    ids, mask = right_padded(tok, rows)
    labels = torch.full_like(ids, -100)
    for r, (n, m) in enumerate(spans):
        labels[r, n - 1 : n + m - 1] = ids[r, n : n + m]  # the logits at t predict token t + 1
    return Labelled(adapter.trace(ids, mask, out_layers=[below])[1][below], mask, labels)


def _logits(adapter: ModelAdapter, below: int, x: Labelled) -> tuple[Tensor, Tensor]:
    """Logits (N, V) at the N labelled positions (the head runs only there) and the (B, T) selection."""
    selected = x.labels != -100
    return adapter.lm_head(adapter.final_hidden_from(below, x.hidden, x.mask)[selected]), selected


def target_nll(adapter: ModelAdapter, below: int, x: Labelled) -> Tensor:
    """Mean NLL of each row's continuation, (B,)."""
    logits, selected = _logits(adapter, below, x)
    nll = F.cross_entropy(logits, x.labels[selected], reduction="none")
    rows = selected.nonzero()[:, 0]
    return torch.zeros(len(selected), dtype=nll.dtype).index_add(0, rows, nll) / selected.sum(1)


def gradient_factors(adapter: ModelAdapter, layers: list[int], x: Labelled) -> dict[int, tuple[Tensor, Tensor]]:
    """Per edited layer, every token's W_out input u and output gradient δ of the summed target NLLs."""
    zero = {l: torch.zeros(adapter.hidden_size, adapter.inner_size, requires_grad=True) for l in layers}
    with torch.enable_grad(), adapter.w_out_added(zero) as taps:
        loss = target_nll(adapter, layers[0] - 1, x).sum()
        grads = torch.autograd.grad(loss, [taps[l][1] for l in layers])
    return {l: (taps[l][0].detach(), g) for l, g in zip(layers, grads)}


class MendNet(nn.Module):
    """g for one weight shape: two residual low-rank layers, a scale and shift per edited layer (mode), and
    the running mean and variance of its inputs (shared by the modes, as in the release)."""

    def __init__(self, f: int, d: int, n_modes: int, rank: int) -> None:
        super().__init__()
        dim = f + d
        r = min(rank, dim)
        self.f = f
        self.U = nn.Parameter(torch.zeros(2, dim, r))
        self.V = nn.Parameter(torch.randn(2, r, dim))
        self.b = nn.Parameter(torch.zeros(2, dim))
        self.scale = nn.Parameter(torch.ones(2, n_modes, dim))
        self.shift = nn.Parameter(torch.zeros(2, n_modes, dim))
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("mean", torch.zeros(dim, dtype=torch.float64))
        self.register_buffer("m2", torch.zeros(dim, dtype=torch.float64))

    @torch.no_grad()
    def observe(self, z: Tensor) -> None:
        """Fold rows into the running mean and sum of squared deviations (Chan et al.'s pairwise update:
        Welford's one-row update of the release, for a block of rows at once)."""
        z = z.double()
        n_new = z.shape[0]
        mean_new = z.mean(0)
        total = self.count + n_new
        shift = mean_new - self.mean
        self.m2 += ((z - mean_new) ** 2).sum(0) + shift**2 * self.count * n_new / total
        self.mean += shift * n_new / total
        self.count.fill_(total)

    def forward(self, z: Tensor, mode: int) -> Tensor:
        assert self.count >= 2, "MEND's normalisation needs statistics of at least two tokens"
        std = (self.m2 / (self.count - 1)).sqrt()
        x = ((z.double() - self.mean) / (std + NORM_EPS)).float()
        for i in range(2):
            # clamp, not relu: at init every pre-activation is exactly 0, where relu's gradient is 0 and
            # g would never leave the identity; clamp's gradient passes at the bound (as in the release)
            x = x + (self.scale[i, mode] * ((x @ self.V[i].T) @ self.U[i].T + self.b[i]) + self.shift[i, mode]).clamp(
                min=0
            )
        return x


class MendEditor(nn.Module):
    """MEND's editor for `layers` (ascending): g and the per-layer step sizes α."""

    def __init__(self, layers: list[int], f: int, d: int, rank: int, edit_lr: float) -> None:
        super().__init__()
        self.layers = list(layers)
        self.net = MendNet(f, d, len(layers), rank)
        self.alpha = nn.Parameter(torch.full((len(layers),), float(edit_lr)))

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor], config: dict[str, Any]) -> MendEditor:
        net = config["net"]
        editor = cls(config["layers"], net["f"], net["d"], net["rank"], 0.0)
        editor.load_state_dict(tensors)
        return editor

    def weight_deltas(self, factors: dict[int, tuple[Tensor, Tensor]], observe: bool) -> dict[int, Tensor]:
        """ΔW_l = −α_l Σ_t δ̃_t ũ_tᵀ per layer (d × f); `observe` first folds the tokens into the statistics
        (training). Tokens whose u or δ is zero (padding, positions after the last target) carry no edit."""
        rows = {}
        for l, (u, delta) in factors.items():
            u, delta = u.reshape(-1, u.shape[-1]), delta.reshape(-1, delta.shape[-1])
            keep = (u != 0).any(-1) & (delta != 0).any(-1)
            rows[l] = torch.cat([u[keep], delta[keep]], -1)
        if observe:
            self.net.observe(torch.cat(list(rows.values())))
        out = {}
        for i, l in enumerate(self.layers):
            g = self.net(rows[l], i)
            out[l] = -self.alpha[i] * g[:, self.net.f :].T @ g[:, : self.net.f]
        return out

    def deltas(self, adapter: ModelAdapter, tok: PreTrainedTokenizerBase, facts: list[Fact]) -> dict[int, Tensor]:
        """The edit of `facts` on the current weights: one forward/backward of their prompts + targets."""
        texts = [f.prompt.replace("{}", f.subject) for f in facts]
        x = labelled(adapter, tok, self.layers[0] - 1, texts, [f.target_new for f in facts])
        factors = gradient_factors(adapter, self.layers, x)
        with torch.no_grad():
            return self.weight_deltas(factors, observe=False)


Encoded = tuple[Labelled, Labelled, Labelled]  # a record's edit prompt, paraphrase, unrelated prompt


def encode_record(adapter: ModelAdapter, tok: PreTrainedTokenizerBase, below: int, r: TrainingRecord) -> Encoded:
    target = r.fact.target_new
    return (
        labelled(adapter, tok, below, [r.fact.prompt.replace("{}", r.fact.subject)], [target]),
        labelled(adapter, tok, below, [r.paraphrase], [target]),
        labelled(adapter, tok, below, [r.neighborhood], [r.neighborhood_answer]),
    )


def edit_losses(editor: MendEditor, adapter: ModelAdapter, record: Encoded, observe: bool) -> tuple[Tensor, Tensor]:
    """MEND's two training losses for one record: the paraphrase's target NLL after editing the prompt,
    and KL(unedited ‖ edited) of the next-token distributions at the unrelated prompt's answer."""
    edit, paraphrase, unrelated = record
    below = editor.layers[0] - 1
    with torch.no_grad():
        base = _logits(adapter, below, unrelated)[0].log_softmax(-1)
    deltas = editor.weight_deltas(gradient_factors(adapter, editor.layers, edit), observe)
    with adapter.w_out_added(deltas):
        l_edit = target_nll(adapter, below, paraphrase).mean()
        post = _logits(adapter, below, unrelated)[0].log_softmax(-1)
    return l_edit, (base.exp() * (base - post)).sum(-1).mean()


def train(
    adapter: ModelAdapter,
    tok: PreTrainedTokenizerBase,
    p: Params,
    records: list[TrainingRecord],
    heldout: list[TrainingRecord],
    checkpoint: TrainingCheckpoint,
    log: Log = print,
    on_step: Callable[[int], None] | None = None,
) -> Trained:
    """Train MEND's editor for `p.train_editor.max_steps` edits (one record each, every record once per
    epoch in a seeded order), an optimiser step every `mend.accumulate` edits; every `eval_every` steps
    the held-out loss, a curve point and a checkpoint (a rerun resumes from it: same result as an
    uninterrupted run); stop after `patience` evaluations without a lower held-out loss. `on_step` is
    called after every step (tests interrupt training with it)."""
    cfg, t = p.mend, p.train_editor
    adapter.check_layers(list(cfg.layers))
    below = cfg.layers[0] - 1
    torch.manual_seed(t.seed)
    editor = MendEditor(list(cfg.layers), adapter.inner_size, adapter.hidden_size, cfg.rank, cfg.edit_lr)
    opt = torch.optim.Adam(editor.net.parameters(), lr=cfg.lr)
    lr_opt = torch.optim.Adam([editor.alpha], lr=cfg.lr_lr)
    run = TrainingRun(t, editor, "editor", {"opt": opt, "lr_opt": lr_opt}, checkpoint, log)
    cache: dict[int, Encoded] = {}
    held = [encode_record(adapter, tok, below, r) for r in heldout]
    losses: list[tuple[float, float]] = []
    for step in run.steps():
        [index] = run.batch(step, len(records), 1)
        if index not in cache:
            cache[index] = encode_record(adapter, tok, below, records[index])
        l_edit, l_loc = edit_losses(editor, adapter, cache[index], observe=True)
        ((cfg.c_edit * l_edit + cfg.c_loc * l_loc) / cfg.accumulate).backward()
        losses.append((float(l_edit.detach()), float(l_loc.detach())))
        if (step + 1) % cfg.accumulate == 0:
            nn.utils.clip_grad_norm_([*editor.net.parameters(), editor.alpha], cfg.grad_clip)
            opt.step()
            lr_opt.step()
            opt.zero_grad()
            lr_opt.zero_grad()
        done = step + 1
        if run.due(done):
            point = _evaluate(editor, adapter, held, losses, p)
            losses = []
            # a checkpoint only right after an optimiser step: nothing half-accumulated is lost
            if run.evaluated(done, point, save=done % cfg.accumulate == 0):
                break
        if on_step is not None:
            on_step(done)
    config = {
        "layers": editor.layers,
        "net": {"f": adapter.inner_size, "d": adapter.hidden_size, "rank": editor.net.U.shape[-1], "n_hidden": 1},
        **run.summary(),
    }
    return Trained(run.best, config, run.state["curve"])


def _evaluate(
    editor: MendEditor, adapter: ModelAdapter, held: list[Encoded], losses: list[tuple[float, float]], p: Params
) -> dict[str, float]:
    """Mean losses of the training steps since the last point and of every held-out record (g unchanged)."""
    c_edit, c_loc = p.mend.c_edit, p.mend.c_loc
    with torch.no_grad():
        heldout = [tuple(float(x) for x in edit_losses(editor, adapter, r, observe=False)) for r in held]
    point = {}
    for name, rows in (("train", losses), ("heldout", heldout)):
        edit = sum(r[0] for r in rows) / len(rows)
        loc = sum(r[1] for r in rows) / len(rows)
        point |= {f"{name}_loss": c_edit * edit + c_loc * loc, f"{name}_edit": edit, f"{name}_loc": loc}
    return point
