"""General ability of a model before and after editing (SPEC "Evaluation protocol").

Zero-shot label-likelihood classification on the shipped GLUE / NLI / MMLU subsets (data/general):
each example becomes one prompt (templates in `TEMPLATES`), every label word is scored as a
continuation of it with `ece.eval.scoring.continuation_scores` (mean per-token log-probability, so
multi-token label words are not penalised for their length; single-token labels share one forward
pass of the prompt), and the prediction is the label with the highest score (ties: the
first label). The subset is deterministic: the first `n` records of each file
(the shipped files interleave the classes; the first 100 are balanced 50/50, MMLU 25 per letter).

Metrics per task: accuracy; F1 of the positive class for the binary tasks (positive = SST-2 positive,
MRPC equivalent, CoLA acceptable, RTE/NLI entailment); macro-F1 over the four letters for MMLU; and
for CoLA also the Matthews correlation (GLUE's CoLA metric). An F1 with no predicted and no true
positives, or an MCC with a zero denominator, is 0.

Perplexity on held-out text (WikiText-2 test): the first `n_tokens` tokens of the file (tokenized
without special tokens) cut into consecutive non-overlapping windows of `window` tokens; each window is
fed after the document start (`ece.model.prompts.document_start`, or the BOS token of tokenizers that add their
own), so every one of the `n_tokens` tokens is predicted, and ppl = exp(mean NLL over those tokens). Under
torchrun the batches of windows are shared out (ece.model.distributed) and their sums added in batch
order, as one process adds them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedTokenizerBase

from ece.config import GENERAL_TASKS
from ece.errors import EceError
from ece.eval.scoring import Router, continuation_scores
from ece.model import distributed
from ece.model.loading import device_of
from ece.model.prompts import document_start, right_padded

TASKS = GENERAL_TASKS


@dataclass(frozen=True)
class Example:
    prompt: str
    labels: tuple[str, ...]  # label words, scored as continuations (a leading space is added)
    gold: int  # index into labels


@dataclass(frozen=True)
class Template:
    labels: tuple[str, ...]
    positive: int | None  # index of the positive class (None: multi-class)
    build: Callable[[dict[str, Any]], tuple[str, int]]  # record → (prompt, gold index)


def _sst2(r: dict[str, Any]) -> tuple[str, int]:
    return f"Review: {r['sentence']}\nSentiment:", 0 if int(r["label"]) == 1 else 1


def _mrpc(r: dict[str, Any]) -> tuple[str, int]:
    prompt = f"Sentence 1: {r['sentence1']}\nSentence 2: {r['sentence2']}\nQuestion: Do both sentences mean the same thing?\nAnswer:"
    return prompt, 0 if int(r["label"]) == 1 else 1  # 1 = equivalent


def _cola(r: dict[str, Any]) -> tuple[str, int]:
    return f"Sentence: {r['sentence']}\nQuestion: Is this sentence grammatically correct?\nAnswer:", 0 if int(
        r["label"]
    ) == 1 else 1


def _entailment(r: dict[str, Any], gold_yes: bool) -> tuple[str, int]:
    return f"{r['sentence1']}\nQuestion: {r['sentence2']} True or False?\nAnswer:", 0 if gold_yes else 1


def _rte(r: dict[str, Any]) -> tuple[str, int]:
    return _entailment(r, int(r["label"]) == 0)  # GLUE RTE: 0 = entailment, 1 = not_entailment


def _nli(r: dict[str, Any]) -> tuple[str, int]:
    return _entailment(r, str(r["label"]) == "entailment")


def _mmlu(r: dict[str, Any]) -> tuple[str, int]:
    subject = str(r.get("subject", "")).replace("_", " ")
    options = "".join(f"{letter}. {choice}\n" for letter, choice in zip("ABCD", r["choices"]))
    return f"The following is a multiple choice question about {subject}.\n\n{r['question']}\n{options}Answer:", int(
        r["answer"]
    )


TEMPLATES: dict[str, Template] = {
    "sst2": Template(("positive", "negative"), 0, _sst2),
    "mrpc": Template(("yes", "no"), 0, _mrpc),
    "cola": Template(("yes", "no"), 0, _cola),
    "rte": Template(("True", "False"), 0, _rte),
    "nli": Template(("True", "False"), 0, _nli),
    "mmlu": Template(("A", "B", "C", "D"), None, _mmlu),
}


def load_task(data_dir: str | Path, task: str, n: int) -> list[Example]:
    """The first `n` records (0 = all) of data_dir/<task>.json as examples."""
    if task not in TEMPLATES:
        raise EceError(f"unknown general-ability task '{task}'", f"use any of {', '.join(TASKS)}")
    path = Path(data_dir) / f"{task}.json"
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise EceError(
            f"cannot read {path}: {exc}", "see data/README.md for the shipped general-ability sets"
        ) from None
    template = TEMPLATES[task]
    out = []
    for r in records[: n if n > 0 else None]:
        prompt, gold = template.build(r)
        out.append(Example(prompt, template.labels, gold))
    return out


def label_scores(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    examples: list[Example],
    batch_size: int = 16,
    router: Router | None = None,
) -> list[list[float]]:
    """Mean per-token log-probability of every label of every example, as a continuation of its prompt.

    Every (prompt, label) pair goes to `continuation_scores`, which runs a prompt whose labels are all
    one token (all six templates with the SmolLM2 and GPT-2 tokenizers) once for all its labels."""
    pairs = [(e.prompt, label) for e in examples for label in e.labels]
    logprob, _ = continuation_scores(
        model, tok, [p for p, _ in pairs], [label for _, label in pairs], batch_size, router
    )
    flat = logprob.tolist()
    out, s = [], 0
    for e in examples:
        out.append(flat[s : s + len(e.labels)])
        s += len(e.labels)
    return out


def predict(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    examples: list[Example],
    batch_size: int = 16,
    router: Router | None = None,
) -> list[int]:
    """Index of the most likely label of each example (ties: the first label)."""
    scores = label_scores(model, tok, examples, batch_size, router)
    return [max(range(len(row)), key=lambda j: (row[j], -j)) for row in scores]


# ---------------------------------------------------------------------------------------------
# Metrics, written out (no scikit-learn)


def accuracy(pred: list[int], gold: list[int]) -> float:
    return sum(p == g for p, g in zip(pred, gold)) / len(gold) if gold else 0.0


def _confusion(pred: list[int], gold: list[int], positive: int) -> tuple[int, int, int, int]:
    tp = sum(p == positive and g == positive for p, g in zip(pred, gold))
    fp = sum(p == positive and g != positive for p, g in zip(pred, gold))
    fn = sum(p != positive and g == positive for p, g in zip(pred, gold))
    tn = len(gold) - tp - fp - fn
    return tp, fp, fn, tn


def f1(pred: list[int], gold: list[int], positive: int) -> float:
    """F1 of the class `positive`: 2TP / (2TP + FP + FN)."""
    tp, fp, fn, _ = _confusion(pred, gold, positive)
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0


def macro_f1(pred: list[int], gold: list[int], n_classes: int) -> float:
    return sum(f1(pred, gold, c) for c in range(n_classes)) / n_classes


def mcc(pred: list[int], gold: list[int], positive: int) -> float:
    """Matthews correlation (TP·TN − FP·FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN))."""
    tp, fp, fn, tn = _confusion(pred, gold, positive)
    den = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return (tp * tn - fp * fn) / den if den else 0.0


def task_metrics(task: str, pred: list[int], gold: list[int]) -> dict[str, float | int]:
    template = TEMPLATES[task]
    out: dict[str, float | int] = {"n": len(gold), "accuracy": accuracy(pred, gold)}
    if template.positive is None:
        out["f1"] = macro_f1(pred, gold, len(template.labels))
    else:
        out["f1"] = f1(pred, gold, template.positive)
        if task == "cola":
            out["mcc"] = mcc(pred, gold, template.positive)
    return out


def general_ability(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    data_dir: str | Path,
    tasks: list[str],
    n: int,
    batch_size: int = 16,
    router: Router | None = None,
) -> dict[str, dict[str, float | int]]:
    """Per task: n, accuracy, f1 (and mcc for CoLA); `router`: each prompt is read after its context."""
    out = {}
    for task in tasks:
        examples = load_task(data_dir, task, n)
        pred = predict(model, tok, examples, batch_size, router)
        out[task] = task_metrics(task, pred, [e.gold for e in examples])
    return out


# ---------------------------------------------------------------------------------------------
# Perplexity


def read_tokens(tok: PreTrainedTokenizerBase, path: str | Path, n_tokens: int) -> list[int]:
    """The first `n_tokens` tokens of a text file (fewer if the file is shorter)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise EceError(f"cannot read {path}: {exc}", "evaluate.ppl_corpus must be a text file") from None
    ids = tok(text[: n_tokens * 12], add_special_tokens=False).input_ids  # ~4 chars a token: ample
    if len(ids) < n_tokens and n_tokens * 12 < len(text):
        ids = tok(text, add_special_tokens=False).input_ids
    return list(ids[:n_tokens])


def _start_ids(tok: PreTrainedTokenizerBase) -> list[int]:
    start = document_start(tok)
    if not start and tok.bos_token_id is not None:
        start = [tok.bos_token_id]
    return start


@torch.no_grad()
def perplexity(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    ids: list[int],
    window: int,
    batch_size: int = 4,
    router: Router | None = None,
) -> float:
    """exp(mean NLL) of `ids` read in consecutive windows of `window` tokens, each after the document start
    (`router`: and after the context it gives the window's text; only the window's tokens are scored)."""
    if not ids:
        raise EceError("no tokens to compute perplexity on", "check evaluate.ppl_corpus and evaluate.ppl_tokens")
    start = _start_ids(tok)
    windows = [ids[s : s + window] for s in range(0, len(ids), window)]
    contexts = router([tok.decode(w) for w in windows]) if router is not None else [""] * len(windows)
    prefixes = [start + (tok(c, add_special_tokens=False).input_ids if c else []) for c in contexts]
    rows = [pre + w for pre, w in zip(prefixes, windows)]
    batches, device = range(0, len(rows), batch_size), device_of(model)
    # per batch, zero for other processes' batches (ece.model.distributed), summed in batch order below
    nll, count = torch.zeros(len(batches), dtype=torch.float64), torch.zeros(len(batches), dtype=torch.int64)
    for j in distributed.shard(range(len(batches))):
        x, mask = right_padded(tok, rows[batches[j] : batches[j] + batch_size])
        x, mask = x.to(device), mask.to(device)  # the logits stay where the model is: only the sums leave
        logits = model(input_ids=x, attention_mask=mask).logits.float()
        labels = x[:, 1:].clone()
        labels[mask[:, 1:] == 0] = -100
        for r, pre in enumerate(prefixes[batches[j] : batches[j] + batch_size]):
            labels[r, : max(len(pre) - 1, 0)] = -100  # the context's tokens are read, not scored
        nll[j] = float(
            F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum"
            )
        )
        count[j] = int((labels != -100).sum())
    return math.exp(sum(distributed.all_sum(nll).tolist()) / int(distributed.all_sum(count).sum()))
