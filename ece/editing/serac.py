"""SERAC (Mitchell et al., ICML 2022, "Memory-Based Model Editing at Scale"): edits are kept in a memory,
not written into the weights. The edited model is the unchanged base model plus

- an edit memory: per edited fact its edit statement ("{prompt with the subject} {target_new}"), the batch
  that added it and its embedding. Batch b appends its facts, so the memory after batch b holds the facts
  of batches 0..b (`EditMemory.upto`);
- a scope classifier, the paper's embedding variant: a text's embedding is the mean over its tokens (the
  document start left out: an attention sink, the same for every text) of the FROZEN base model's hidden
  state after block `serac.embed_layer`, centred on the training texts' mean, projected by a trained W
  (dim × d) and normalised; p(query q is in the scope of edit e) = σ(cos(e, q)/τ + b), W, τ, b trained;
- a counterfactual model: the base model with the retrieved edit statement in its context,
  "{statement}. {query}". The paper fine-tunes a separate sequence model for this; the base model reading
  the edit in context needs no training beyond the classifier's, which is what a 2-core CPU affords.

A query goes to the counterfactual model with the memory entry of highest probability when that
probability exceeds `serac.threshold`, to the base model alone otherwise (`MemoryRouter`: it returns the
context to put before each text and records which entry answered which text, for the audit).

Training (stage train_editor, `train`): per training record, the positives are its statement paired with
its own prompt and each paraphrase; the negatives its statement paired with its neighbourhood prompts
(same relation and object, another subject: the hard cases), with every query of the step's other
records, and with `serac.general_negatives` general texts drawn for the step: windows of
`covariance.corpus` (`general_windows`), texts about no edited fact such as the general-ability prompts
and perplexity windows the evaluation routes too. Trained on CounterFact prompts alone, the classifier
had never seen such texts and sent almost all of them to the memory. The base model is frozen, so every
training text is embedded once, before the first step, and only W, τ and b train (Adam); the loss is
binary cross-entropy with the positive and the negative pairs weighted equally (they are about 1:30 in
number). On the held-out records (their statements as the memory, their queries and a held-out share of
the windows as queries) `heldout_routing` says which share of each kind of text a threshold would send
to the memory: what `serac.threshold` is chosen from, never from the facts being evaluated.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from ece.config import Params
from ece.data.editor_data import TrainingRecord
from ece.data.facts import Fact
from ece.data.io import sha256_json, write_json
from ece.editing.covariance import corpus_texts
from ece.editing.editor_io import Trained, TrainingCheckpoint, TrainingRun
from ece.errors import EceError
from ece.model.adapter import ModelAdapter
from ece.model.loading import weights_fingerprint
from ece.model.prompts import document_start, right_padded

MEMORY_DIR = "edit_memory"  # inside the edited model folder: the folder alone is the whole edited model
FIX = "rerun apply_edits (`dvc repro apply_edits`) for this model"
Log = Callable[[str], None]
KINDS = ("own prompt", "paraphrase", "neighbourhood")  # Split.kind codes 0, 1, 2; "general text" apart
THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)  # the held-out routing table's rows


def statement(fact: Fact) -> str:
    """The edit as a sentence: the prompt with its subject, then the new object."""
    return fact.prompt.replace("{}", fact.subject) + " " + fact.target_new


def context(edit_statement: str) -> str:
    """What the counterfactual model reads before a query answered by that edit."""
    return edit_statement + ". "


@torch.no_grad()
def pooled_states(
    adapter: ModelAdapter, tok: PreTrainedTokenizerBase, texts: list[str], layer: int, batch_size: int = 32
) -> Tensor:
    """(n, d) float32: per text, the mean over its tokens after the document start of block `layer`'s
    output. Rows are right-padded (positions do not depend on the batch) and batched by length."""
    start = document_start(tok)
    skip = len(start) + len(tok("").input_ids)  # the separator we add, or the tokenizer's own BOS
    rows = [start + list(tok(t).input_ids) for t in texts]
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    out = torch.zeros(len(rows), adapter.hidden_size)
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        ids, mask = right_padded(tok, [rows[i] for i in idx])
        hidden = adapter.trace(ids, mask, out_layers=[layer])[1][layer].cpu()
        weight = mask.float()
        weight[:, :skip] = 0
        out[idx] = (hidden * weight[..., None]).sum(1) / weight.sum(1, keepdim=True).clamp(min=1)
    return out


class ScopeClassifier(nn.Module):
    """p(in scope) = σ(exp(log_scale)·cos(W(e − c), W(q − c)) + bias) of two pooled states e, q."""

    def __init__(self, d: int, dim: int, temperature: float) -> None:
        super().__init__()
        self.proj = nn.Parameter(torch.randn(dim, d) / math.sqrt(d))
        self.log_scale = nn.Parameter(torch.tensor(-math.log(temperature)))  # 1/τ
        self.bias = nn.Parameter(torch.zeros(()))
        self.register_buffer("center", torch.zeros(d))

    def embed(self, pooled: Tensor) -> Tensor:
        return F.normalize((pooled - self.center) @ self.proj.T, dim=-1)

    def logits(self, edits: Tensor, queries: Tensor) -> Tensor:
        """(n_edits, n_queries) logits of embedded edits and queries."""
        return self.log_scale.exp() * edits @ queries.T + self.bias


def general_windows(path: str | Path, n: int, words: list[int], seed: int) -> list[str]:
    """One window of whole words from each of the first `n` documents of the corpus, its length drawn
    uniformly from [words[0], words[1]] and its start uniformly within the document (seeded): texts from
    prompt length to paragraph length, as the evaluation routes, about no edited fact."""
    rng = random.Random(seed)
    out = []
    for text in corpus_texts(path):
        if len(out) == n:
            break
        tokens = text.split()
        length = rng.randint(words[0], words[1])
        start = rng.randint(0, max(0, len(tokens) - length))
        out.append(" ".join(tokens[start : start + length]))
    return out


@dataclass
class Split:
    """The pooled states of some records' texts: one statement per record, their queries with the
    record each belongs to and its kind (0 own prompt, 1 paraphrase: in that record's scope; 2 neighbourhood
    prompt: not), and general texts (in no record's scope)."""

    statements: Tensor  # (n, d)
    queries: Tensor  # (q, d)
    owner: Tensor  # (q,) record index
    kind: Tensor  # (q,) index into KINDS
    general: Tensor  # (g, d)

    @property
    def in_scope(self) -> Tensor:
        return self.kind < 2


def _split(
    adapter: ModelAdapter, tok: PreTrainedTokenizerBase, layer: int, records: list[TrainingRecord], general: list[str]
) -> Split:
    statements = [statement(r.fact) for r in records]
    queries, owner, kind = [], [], []
    for i, r in enumerate(records):
        groups = [[r.fact.prompt.replace("{}", r.fact.subject)], r.paraphrases or (r.paraphrase,)]
        for k, texts in enumerate([*groups, r.neighborhoods or (r.neighborhood,)]):
            queries += texts
            owner += [i] * len(texts)
            kind += [k] * len(texts)
    texts = list(dict.fromkeys(statements + queries + general))
    pooled = pooled_states(adapter, tok, texts, layer)
    row = {t: i for i, t in enumerate(texts)}
    return Split(
        pooled[[row[t] for t in statements]],
        pooled[[row[t] for t in queries]],
        torch.tensor(owner),
        torch.tensor(kind),
        pooled[torch.tensor([row[t] for t in general], dtype=torch.long)],
    )


def pair_losses(clf: ScopeClassifier, data: Split, records: Tensor, general: Tensor) -> Tensor:
    """Balanced BCE of every (statement of `records`, query of `records` or general text `general`) pair:
    the mean over the in-scope pairs and the mean over all the others, averaged."""
    chosen = torch.isin(data.owner, records)
    statements = clf.embed(data.statements[records])
    logits = torch.cat(
        [
            clf.logits(statements, clf.embed(data.queries[chosen])),
            clf.logits(statements, clf.embed(data.general[general])),
        ],
        dim=1,
    )
    own = data.owner[chosen][None, :] == records[:, None]
    labels = torch.cat(
        [own & data.in_scope[chosen][None, :], torch.zeros(len(records), len(general), dtype=torch.bool)], 1
    )
    bce = F.binary_cross_entropy_with_logits(logits, labels.float(), reduction="none")
    return 0.5 * (bce[labels].mean() + bce[~labels].mean())


@torch.no_grad()
def heldout_routing(clf: ScopeClassifier, data: Split, thresholds: tuple[float, ...] = THRESHOLDS) -> list[dict]:
    """Per threshold, with `data`'s statements as the memory (the router's rule: a text goes to its most
    probable entry when that probability exceeds the threshold): the share of own prompts and of
    paraphrases answered by their own record's entry, and of neighbourhood prompts and general texts
    answered by any entry."""
    statements = clf.embed(data.statements)
    best, entry = torch.sigmoid(clf.logits(statements, clf.embed(data.queries))).max(0)
    general = torch.sigmoid(clf.logits(statements, clf.embed(data.general))).amax(0)
    rows = []
    for t in thresholds:
        routed = (best > t) & ((entry == data.owner) | ~data.in_scope)
        row = {"threshold": t} | {k: float(routed[data.kind == i].float().mean()) for i, k in enumerate(KINDS)}
        rows.append(row | {"general text": float((general > t).float().mean()) if len(general) else None})
    return rows


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
    """Train the scope classifier for `train_editor.max_steps` steps of `serac.batch_records` records
    each (every record once per epoch, in a seeded order); every `eval_every` steps the held-out loss, a
    curve point and a checkpoint (a rerun resumes from it); stop after `patience` evaluations without a
    lower held-out loss. The pooled states are recomputed on a resume (seconds): they are a pure
    function of the frozen model."""
    cfg, t = p.serac, p.train_editor
    if not cfg.embed_layer < adapter.n_layers:
        raise EceError(
            f"serac.embed_layer {cfg.embed_layer} is out of range: the model has {adapter.n_layers} layers",
            f"set serac.embed_layer in params.yaml to one of 0..{adapter.n_layers - 1}",
        )
    start = time.perf_counter()
    general = (
        general_windows(p.covariance.corpus, cfg.general_texts, cfg.general_words, t.seed)
        if cfg.general_negatives
        else []
    )
    n_held = round(len(general) * len(heldout) / (len(records) + len(heldout)))  # the records' split
    data = _split(adapter, tok, cfg.embed_layer, records, general[: len(general) - n_held])
    held = _split(adapter, tok, cfg.embed_layer, heldout, general[len(general) - n_held :])
    embed_seconds = time.perf_counter() - start
    texts = len(data.queries) + len(data.statements) + len(data.general)
    log(f"train_editor: {texts} training texts ({len(data.general)} general) embedded in {embed_seconds:.1f} s")
    torch.manual_seed(t.seed)
    clf = ScopeClassifier(adapter.hidden_size, cfg.dim, cfg.temperature)
    clf.center.copy_(torch.cat([data.statements, data.queries, data.general]).mean(0))
    opt = torch.optim.Adam(clf.parameters(), lr=cfg.lr)
    run = TrainingRun(t, clf, "clf", {"opt": opt}, checkpoint, log)
    n, m = len(records), min(cfg.batch_records, len(records))
    losses: list[float] = []
    for step in run.steps():
        draw = torch.Generator().manual_seed(int(sha256_json([t.seed, "general", step])[:15], 16))
        drawn = torch.randperm(len(data.general), generator=draw)[: cfg.general_negatives]
        loss = pair_losses(clf, data, torch.tensor(run.batch(step, n, m)), drawn)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        done = step + 1
        if run.due(done):
            with torch.no_grad():
                held_loss = pair_losses(clf, held, torch.arange(len(heldout)), torch.arange(len(held.general)))
            point = {"train_loss": sum(losses) / len(losses), "heldout_loss": float(held_loss)}
            rates = heldout_routing(clf, held, (0.5,))[0]
            point |= {f"heldout_routed_{k.replace(' ', '_')}": v for k, v in rates.items() if k != "threshold"}
            losses = []
            note = "; routed at p > 0.5: " + ", ".join(
                f"{k} {v:.2f}" for k, v in rates.items() if isinstance(v, float) and k != "threshold"
            )
            if run.evaluated(done, point, note):
                break
        if on_step is not None:
            on_step(done)
    clf.load_state_dict(run.best)
    config = {
        "embed_layer": cfg.embed_layer,
        "d": adapter.hidden_size,
        "dim": cfg.dim,
        **run.summary(),
        "records_per_step": m,
        "general_texts": {"train": len(data.general), "heldout": len(held.general)},
        "texts_embedded": texts + len(held.statements) + len(held.queries) + len(held.general),
        "embed_seconds": round(embed_seconds, 1),
        # the saved classifier on the held-out records: what serac.threshold is chosen from
        "heldout_routing": heldout_routing(clf, held),
    }
    return Trained(run.best, config, run.state["curve"])


def _classifier(tensors: dict[str, Tensor], config: dict[str, Any]) -> ScopeClassifier:
    clf = ScopeClassifier(config["d"], config["dim"], 1.0)
    clf.load_state_dict(tensors)
    return clf


class SeracEditor:
    """SERAC's trained part as the Editor sees it: it writes no weight (no layers, no deltas); what a
    batch adds is its entries of the edit memory (`memory`)."""

    def __init__(self, classifier: ScopeClassifier, embed_layer: int) -> None:
        self.layers: list[int] = []
        self.classifier = classifier
        self.embed_layer = embed_layer

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor], config: dict[str, Any]) -> SeracEditor:
        return cls(_classifier(tensors, config), config["embed_layer"])

    def deltas(self, adapter: ModelAdapter, tok: PreTrainedTokenizerBase, facts: list[Fact]) -> dict[int, Tensor]:
        return {}

    @torch.no_grad()
    def memory(
        self, adapter: ModelAdapter, tok: PreTrainedTokenizerBase, batches: list[list[Fact]], threshold: float
    ) -> EditMemory:
        """The edit memory after the batches, in order: batch b's facts appended after batch b−1's."""
        facts = [(b, f) for b, batch in enumerate(batches) for f in batch]
        texts = [statement(f) for _, f in facts]
        keys = self.classifier.embed(pooled_states(adapter, tok, texts, self.embed_layer))
        return EditMemory(
            [f.id for _, f in facts],
            [b for b, _ in facts],
            texts,
            keys,
            self.classifier,
            self.embed_layer,
            threshold,
            weights_fingerprint(adapter.model),
        )


@dataclass
class EditMemory:
    """The edits SERAC answers from, with the classifier that routes to them."""

    ids: list[str]
    batches: list[int]
    statements: list[str]
    keys: Tensor  # (n, dim) embedded statements
    classifier: ScopeClassifier
    embed_layer: int
    threshold: float
    base_weights: str  # fingerprint of the weights the embeddings were computed with (and that answer)

    def upto(self, batch: int) -> EditMemory:
        """The memory as it stood right after `batch`."""
        n = sum(b <= batch for b in self.batches)
        return EditMemory(
            self.ids[:n],
            self.batches[:n],
            self.statements[:n],
            self.keys[:n],
            self.classifier,
            self.embed_layer,
            self.threshold,
            self.base_weights,
        )

    def save(self, folder: Path) -> None:
        """Into `folder` (inside an atomic write of the edited model): the table, the tensors, the config."""
        folder.mkdir(parents=True)
        pl.DataFrame({"id": self.ids, "batch": self.batches, "statement": self.statements}).write_parquet(
            folder / "memory.parquet"
        )
        tensors = {"keys": self.keys, **{f"classifier.{k}": v for k, v in self.classifier.state_dict().items()}}
        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(folder / "memory.safetensors"))
        d = self.classifier.proj.shape[1]
        config = {"method": "serac", "embed_layer": self.embed_layer, "threshold": self.threshold, "d": d}
        write_json(folder / "memory.json", {**config, "dim": self.keys.shape[1], "base_weights": self.base_weights})

    @classmethod
    def load(cls, folder: Path) -> EditMemory:
        try:
            config = json.loads((folder / "memory.json").read_text())
            table = pl.read_parquet(folder / "memory.parquet")
            tensors = load_file(str(folder / "memory.safetensors"))
            clf = _classifier({k[11:]: v for k, v in tensors.items() if k.startswith("classifier.")}, config)
        except Exception as exc:  # json, parquet and safetensors raise several types for a damaged file
            raise EceError(f"no readable edit memory in {folder} ({type(exc).__name__}: {exc})", FIX) from None
        if tensors["keys"].shape[0] != table.height or not torch.isfinite(tensors["keys"]).all():
            raise EceError(f"the edit memory in {folder} is damaged (keys do not match its table)", FIX)
        return cls(
            table["id"].to_list(),
            table["batch"].to_list(),
            table["statement"].to_list(),
            tensors["keys"],
            clf,
            config["embed_layer"],
            config["threshold"],
            config["base_weights"],
        )


class MemoryRouter:
    """Routes texts through an edit memory: per text the context the counterfactual model reads before
    it ("" = the base model alone), each decision kept (text → memory entry, probability) for the audit."""

    def __init__(self, memory: EditMemory, adapter: ModelAdapter, tok: PreTrainedTokenizerBase) -> None:
        self.memory, self.adapter, self.tok = memory, adapter, tok
        self.decisions: dict[str, tuple[int | None, float | None]] = {}

    @torch.no_grad()
    def probabilities(self, texts: list[str]) -> Tensor:
        """(n_entries, n_texts) p(text in the scope of entry)."""
        m = self.memory
        queries = m.classifier.embed(pooled_states(self.adapter, self.tok, texts, m.embed_layer))
        return torch.sigmoid(m.classifier.logits(m.keys, queries))

    def __call__(self, texts: list[str]) -> list[str]:
        new = [t for t in dict.fromkeys(texts) if t not in self.decisions]
        if new and self.memory.ids:
            best, entry = self.probabilities(new).max(0)
            for t, pr, e in zip(new, best.tolist(), entry.tolist()):
                self.decisions[t] = (e if pr > self.memory.threshold else None, pr)
        else:
            self.decisions.update(dict.fromkeys(new, (None, None)))
        return ["" if (e := self.decisions[t][0]) is None else context(self.memory.statements[e]) for t in texts]

    def upto(self, batch: int) -> MemoryRouter:
        return MemoryRouter(self.memory.upto(batch), self.adapter, self.tok)

    def routing(self) -> pl.DataFrame:
        """One row per text routed so far: the memory entry that answered it (null: the base model), its
        batch, and the classifier's best probability."""
        rows = [
            {
                "text": t,
                "memory_id": None if e is None else self.memory.ids[e],
                "memory_batch": None if e is None else self.memory.batches[e],
                "probability": pr,
            }
            for t, (e, pr) in self.decisions.items()
        ]
        return pl.DataFrame(rows, schema=ROUTING_SCHEMA)


ROUTING_SCHEMA: dict[str, pl.DataType] = {
    "text": pl.Utf8(),
    "memory_id": pl.Utf8(),
    "memory_batch": pl.Int64(),
    "probability": pl.Float64(),
}


def open_router(folder: Path, model: nn.Module, tok: PreTrainedTokenizerBase) -> MemoryRouter:
    """The router of the edited model in `folder` (its MEMORY_DIR), refused when its memory was built on
    other weights than `model`'s."""
    memory = EditMemory.load(Path(folder) / MEMORY_DIR)
    found = weights_fingerprint(model)
    if found != memory.base_weights:
        raise EceError(
            f"the edit memory in {folder} was built on another model (fingerprint {memory.base_weights}, "
            f"this one is {found})",
            FIX,
        )
    return MemoryRouter(memory, ModelAdapter(model), tok)
