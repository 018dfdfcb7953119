"""Teacher-forced likelihoods of continuations: the primitive behind every probability-based metric.

The cost is the model's forward passes (on CPU a 135M model is bound by compute, about a fixed cost
per token), so no token is run twice:
- a row's model input is its text followed by all but the last continuation token, so every
  one-token continuation of a text (P(target_new) and P(target_true) of a prompt, every label word of
  a classification prompt) and the same text asked for several facts share ONE input, run once;
- an input that is a prefix of another (the text alone and the text + the first token of a longer
  continuation) is read from the longer one: attention is causal, so the logits at a position do not
  depend on the tokens after it;
- only the positions that are read go through the output layer (`logits_to_keep`, where the model
  takes it): the vocabulary projection is a fifth of SmolLM2's compute per token.
The numbers are those of one unpadded forward per row up to float rounding (tests/test_scoring.py).
A model that answers through an edit memory (SERAC) reads each text after the context its `Router`
puts before it: the text alone is routed, never text + continuation, so the answer cannot leak into the
choice of the edit.
Under torchrun each process runs every world_size-th batch (ece.model.distributed) and the rows are
summed over processes: each batch is the one a single process runs, so the numbers are identical.
"""

from __future__ import annotations

import inspect
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from ece.model import distributed
from ece.model.loading import device_of
from ece.model.prompts import document_start, right_padded, target_ids

Ids = tuple[int, ...]


class Router(Protocol):
    """How a model that answers through an edit memory reads texts: per text the context put before it
    ("" = none). ece.editing.serac.MemoryRouter is one; a model whose weights hold the edits has none."""

    def __call__(self, texts: list[str]) -> list[str]: ...


def routed(texts: list[str], router: Router | None) -> list[str]:
    """The texts as the model reads them: after their contexts, if it answers through a memory."""
    return texts if router is None else [c + t for c, t in zip(router(texts), texts)]


def covering_inputs(inputs: set[Ids]) -> dict[Ids, Ids]:
    """Each input → the longest input that starts with it (itself when none does).

    Sorted, the inputs that extend `x` come right after `x`, so one backward pass over the sorted
    list finds every one's longest extension.
    """
    ordered = sorted(inputs)
    owner: dict[Ids, Ids] = {}
    for k in range(len(ordered) - 1, -1, -1):
        x = ordered[k]
        after = ordered[k + 1] if k + 1 < len(ordered) else ()
        owner[x] = owner[after] if after[: len(x)] == x else x
    return owner


def distinct_inputs(
    tok: PreTrainedTokenizerBase, texts: list[str], continuations: list[str]
) -> tuple[list[tuple[list[int], list[int]]], dict[Ids, list[int]]]:
    """The token ids (text after the document start, continuation) of every row, and the inputs to run,
    each with the rows read from it."""
    start = document_start(tok)
    text_ids = {t: start + list(tok(t).input_ids) for t in dict.fromkeys(texts)}
    cont_ids = {c: target_ids(tok, c) for c in dict.fromkeys(continuations)}
    rows = [(text_ids[t], cont_ids[c]) for t, c in zip(texts, continuations)]
    owner = covering_inputs({tuple(t + c[:-1]) for t, c in rows})
    readers: dict[Ids, list[int]] = {}
    for i, (t, c) in enumerate(rows):
        readers.setdefault(owner[tuple(t + c[:-1])], []).append(i)
    return rows, readers


@torch.no_grad()
def continuation_scores(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    texts: list[str],
    continuations: list[str],
    batch_size: int = 32,
    router: Router | None = None,
) -> tuple[Tensor, Tensor]:
    """Mean per-token log-probability of each continuation after its text, and the share of its tokens
    that are the greedy (top-1) prediction under teacher forcing (MEMIT's zsRE accuracy). Both (n,).

    `batch_size` counts distinct model inputs per forward pass; `router`: each text is read after its context."""
    rows, readers = distinct_inputs(tok, routed(texts, router), continuations)
    keep = "logits_to_keep" in inspect.signature(model.forward).parameters
    logprob, accuracy = torch.zeros(len(rows)), torch.zeros(len(rows))  # zeros: other processes' rows
    run = sorted(readers, key=lambda x: (len(x), x))  # similar lengths share a batch: little padding
    device = device_of(model)
    for s in distributed.shard(range(0, len(run), batch_size)):
        chunk = run[s : s + batch_size]
        ids, mask = right_padded(tok, [list(x) for x in chunk])
        # row i reads positions len(text)-1 ... len(text)+len(continuation)-2 of its input
        positions = {
            i: torch.arange(len(rows[i][0]) - 1, len(rows[i][0]) + len(rows[i][1]) - 1)
            for x in chunk
            for i in readers[x]
        }
        kept = torch.unique(torch.cat(list(positions.values())))
        ids, mask = ids.to(device), mask.to(device)
        if keep:
            logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=kept.to(device)).logits
        else:
            logits = model(input_ids=ids, attention_mask=mask).logits[:, kept.to(device)]
        logits = logits.float().cpu()
        logp = F.log_softmax(logits, dim=-1)
        for b, x in enumerate(chunk):
            for i in readers[x]:
                cols, tgt = torch.searchsorted(kept, positions[i]), torch.tensor(rows[i][1])
                logprob[i] = logp[b, cols, tgt].mean()
                accuracy[i] = (logits[b, cols].argmax(-1) == tgt).float().mean()
    return distributed.all_sum(logprob), distributed.all_sum(accuracy)
