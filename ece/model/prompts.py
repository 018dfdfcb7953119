"""Prompt encoding shared by every stage and method: the document start, the subject's last token,
MEMIT's context prefixes, and greedy completions.

Keys are read over context-prefixed variants of a prompt (MEMIT), so that an edit is written for the
subject in many contexts, not only at the start of a text; the prefixes are greedy continuations of
fixed starter words, hence a pure function of the model.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from ece.errors import EceError

STARTERS = ("The", "Therefore", "Because", "I", "You", "It", "She", "In", "When", "A")
DOC_SEPARATOR = "<|endoftext|>"


def document_start(tok: PreTrainedTokenizerBase) -> list[int]:
    """Token ids that open a document, for tokenizers that add none themselves.

    SmolLM2 (like GPT-2) was trained on documents separated by <|endoftext|> and adds no BOS; without
    it a prompt's first word is read as a word fragment (it continues "The" with "-the-key...").
    """
    if tok("a").input_ids != tok("a", add_special_tokens=False).input_ids:
        return []  # the tokenizer adds its own BOS
    sep = tok.convert_tokens_to_ids(DOC_SEPARATOR) if DOC_SEPARATOR in tok.get_vocab() else None
    return [sep] if sep is not None else []


def target_ids(tok: PreTrainedTokenizerBase, target: str) -> list[int]:
    """Token ids of a target continuation, with the leading space a continuation has in running text."""
    return tok((target if target.startswith(" ") else " " + target), add_special_tokens=False).input_ids


@torch.no_grad()
def context_templates(model: torch.nn.Module, tok: PreTrainedTokenizerBase, n: int, length: int) -> list[str]:
    """ "{}" plus `n` greedy continuations of fixed starter words, each followed by ". {}".

    Greedy decoding makes the templates a pure function of the model, so every stage that needs
    them recomputes the same list without sharing state. Starters of one token length decode
    together (`greedy_by_length`): SmolLM2's five starters took 3.93 s decoded one after another and
    1.15 s decoded together on 2 cores (reports/stage_startup.md), in every stage that opens the model.
    """
    if n > len(STARTERS):
        raise EceError(f"z.n_context must be <= {len(STARTERS)}, got {n}", "use 5 (MEMIT's value)")
    prompts = [document_start(tok) + tok(starter).input_ids for starter in STARTERS[:n]]  # BOS as in `encode`
    templates = ["{}"]
    for out in greedy_by_length(model, tok, prompts, length):
        text = tok.decode(out, skip_special_tokens=True).replace("{", " ").replace("}", " ")
        templates.append(" ".join(text.split()) + ". {}")
    return templates


@dataclass
class Encoded:
    """A right-padded batch of prompts with the position of each row's last subject token."""

    input_ids: Tensor  # (B, T)
    attention_mask: Tensor  # (B, T)
    subject_pos: Tensor  # (B,)
    lengths: Tensor  # (B,) unpadded lengths


def encode(
    tok: PreTrainedTokenizerBase,
    prompts: list[str],
    subjects: list[str],
    suffixes: list[list[int]] | None = None,
    up_to_subject: bool = False,
) -> Encoded:
    """Tokenize `prompt` with the subject filled in, plus optional token suffixes (e.g. the target),
    after the document start.

    The subject's last token is found from character offsets, which is exact for any tokenizer with
    offsets, instead of re-tokenizing a prefix and hoping the merges agree. `up_to_subject` ends each
    row at that token: in a causal model nothing after it changes what is read there (keys, the hidden
    state at the subject), so the tokens after it would only cost time.
    """
    rows: list[list[int]] = []
    positions: list[int] = []
    start_ids = document_start(tok)
    for i, (prompt, subject) in enumerate(zip(prompts, subjects)):
        start = prompt.index("{}")
        text = prompt[:start] + subject + prompt[start + 2 :]
        end = start + len(subject)
        enc = tok(text, return_offsets_mapping=True)
        ids = start_ids + list(enc["input_ids"])
        last = [j for j, (s, e) in enumerate(enc["offset_mapping"]) if s < end and e > s]
        if not last:
            raise EceError(f"subject {subject!r} is not visible in {text!r} after tokenization", "check the prompt")
        pos = last[-1] + len(start_ids)
        if up_to_subject:
            assert not suffixes, "a suffix after a row cut at its subject would not follow the prompt"
            ids = ids[: pos + 1]
        rows.append(ids + (suffixes[i] if suffixes else []))
        positions.append(pos)
    ids, mask = right_padded(tok, rows)
    return Encoded(ids, mask, torch.tensor(positions), mask.sum(1))


def right_padded(tok: PreTrainedTokenizerBase, rows: list[list[int]]) -> tuple[Tensor, Tensor]:
    """(input_ids, attention_mask), both (len(rows), longest row): rows padded on the right, so that a
    row's positions (and the position ids the model gives them) do not depend on its batch."""
    width = max(len(r) for r in rows)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return ids, mask


def length_blocks(lengths: Tensor, forward_cost: int) -> list[tuple[int, int, int]]:
    """(first row, end row, width) of the blocks that rows of ascending `lengths` run in, each cut to its
    longest row: the runs of rows of one length, neighbouring runs merged where that is cheaper. A block
    costs its rows × its width in tokens plus `forward_cost` (one more forward through the model), and the
    split of the sorted runs with the least total is taken (exact, by dynamic programming over the few
    distinct lengths)."""
    widths, counts = torch.unique_consecutive(lengths, return_counts=True)
    widths, ends = widths.tolist(), [0, *counts.cumsum(0).tolist()]
    best, cut = [0] + [sys.maxsize] * len(widths), [0] * (len(widths) + 1)
    for j in range(1, len(widths) + 1):  # best[j]: the cheapest split of the first j runs
        for i in range(j):
            cost = best[i] + (ends[j] - ends[i]) * widths[j - 1] + forward_cost
            if cost < best[j]:
                best[j], cut[j] = cost, i
    out, j = [], len(widths)
    while j:
        out.append((ends[cut[j]], ends[j], widths[j - 1]))
        j = cut[j]
    return out[::-1]


def at_positions(x: Tensor, pos: Tensor) -> Tensor:
    """x[b, pos[b]] for every row b (on x's device)."""
    return x[torch.arange(x.shape[0], device=x.device), pos.to(x.device)]


def greedy(model: torch.nn.Module, tok: PreTrainedTokenizerBase, texts: list[str], max_new_tokens: int) -> list[str]:
    """Greedy continuation (new text only) of each text, after the tokenizer's document start."""
    rows = [document_start(tok) + list(tok(text).input_ids) for text in texts]
    outs = greedy_by_length(model, tok, rows, max_new_tokens)
    return [tok.decode(out[len(ids) :], skip_special_tokens=True) for ids, out in zip(rows, outs)]


@torch.no_grad()
def greedy_by_length(
    model: torch.nn.Module, tok: PreTrainedTokenizerBase, rows: list[list[int]], max_new_tokens: int
) -> list[Tensor]:
    """Greedy continuations of token sequences of any lengths, in their order: the rows of one length
    decode as one batch (`greedy_rows`). Each one-token step reads every weight of the model, so a
    batch of k rows costs about one row's time, not k."""
    by_length: dict[int, list[int]] = {}
    for i, ids in enumerate(rows):
        by_length.setdefault(len(ids), []).append(i)
    outs: dict[int, Tensor] = {}
    for same in by_length.values():
        outs.update(zip(same, greedy_rows(model, tok, [rows[i] for i in same], max_new_tokens)))
    return [outs[i] for i in range(len(rows))]


@torch.no_grad()
def greedy_rows(
    model: torch.nn.Module, tok: PreTrainedTokenizerBase, rows: list[list[int]], max_new_tokens: int
) -> list[Tensor]:
    """Greedy continuations of token sequences of one length, decoded as one batch (no padding, so
    each row's continuation is its own): each whole sequence, prompt included, (T,). A row that ends
    (EOS) before the others is padded after its end, and the padding is cut off again."""
    if len({len(r) for r in rows}) != 1:
        raise ValueError(f"greedy_rows decodes rows of one length, got lengths {sorted({len(r) for r in rows})}")
    x = torch.tensor(rows, device=model.device)
    out = model.generate(
        x,
        attention_mask=torch.ones_like(x),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tok.pad_token_id,
    ).cpu()
    ends = model.generation_config.eos_token_id
    ends = [] if ends is None else [ends] if isinstance(ends, int) else list(ends)
    return [_until_end(row, x.shape[1], ends) for row in out]


def _until_end(row: Tensor, prompt_len: int, ends: list[int]) -> Tensor:
    """`row` cut after its first end-of-sequence token among the new ones: decoded alone it would
    stop there; in a batch, generate pads it until the other rows are done."""
    done = torch.nonzero(torch.isin(row[prompt_len:], torch.tensor(ends, dtype=row.dtype))).squeeze(1)
    return row[: prompt_len + int(done[0]) + 1] if len(done) else row
