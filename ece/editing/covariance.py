"""Second-moment statistics C0 = E[k kᵀ] of the W_out inputs over a text corpus.

C0 stands for "what the layer already knows": the update is penalised by λ·C0 so that keys seen in
ordinary text keep their outputs. Each batch's sum of outer products is computed in float32 and
added into a float64 total (a run sums ~10⁵ outer products, which would lose digits in float32; one
batch's few thousand lose none that matter: 1e-7 relative, measured on SmolLM2). Stored with the
model fingerprint and corpus hash, so a stale file is refused.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from itertools import islice
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase

from ece.config import CovarianceCfg
from ece.data.io import atomic_path
from ece.errors import EceError
from ece.model.adapter import ModelAdapter
from ece.model.prompts import document_start


def corpus_texts(path: str | Path) -> Iterator[str]:
    """Texts of a corpus file: JSONL with a "text" field per line, or plain text split on blank lines."""
    path = Path(path)
    if not path.exists():
        raise EceError(f"corpus file not found: {path}", "set covariance.corpus to an existing .jsonl or .txt file")
    with open(path, encoding="utf-8") as f:
        if path.suffix == ".jsonl":
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        yield json.loads(line)["text"]
                    except (json.JSONDecodeError, KeyError, TypeError):
                        raise EceError(
                            f"{path}:{n}: not a JSON object with a 'text' field", "fix or remove that line"
                        ) from None
        else:
            for block in f.read().split("\n\n"):
                if block.strip():
                    yield block


def token_chunks(texts: Iterable[str], tok: PreTrainedTokenizerBase, seq_len: int) -> Iterator[list[int]]:
    """Pack the corpus into full-length chunks of whole documents, each opened as in pretraining, so
    no token is padding and keys are seen in the same context as the edit prompts'.

    A document opens with `document_start` or, for tokenizers that add a BOS (Gemma), with that BOS,
    as prompts do. `document_start` is asked once: it tokenizes probes and copies the vocabulary
    (~30 ms on SmolLM2), which per document was a quarter of the covariance stage's time.
    """
    start = document_start(tok)
    buffer: list[int] = []
    for text in texts:
        buffer.extend(start + tok(text).input_ids)  # the tokenizer's own BOS, if it adds one
        while len(buffer) >= seq_len:
            yield buffer[:seq_len]
            buffer = buffer[seq_len:]


def second_moments(
    adapter: ModelAdapter,
    tok: PreTrainedTokenizerBase,
    layers: list[int],
    texts: Iterable[str],
    n_tokens: int,
    seq_len: int,
    batch_size: int,
    progress: bool = True,
    part: tuple[int, int] = (0, 1),
    all_sum: Callable[[Tensor], Tensor] | None = None,
) -> tuple[dict[int, Tensor], int]:
    """E[k kᵀ] (float64, f × f) for each layer over the first `n_tokens` corpus tokens.

    Only the chunks that hold those tokens are run (the last one cut at `n_tokens`), `batch_size` to a
    forward; their keys go into the sums by `_add_upper_gram`. Data parallel (ece.model.distributed):
    `part` = (rank, world) runs the chunks rank, rank + world, ... and `all_sum` adds the float64 sums
    and the token count of all processes in place, so C0 is the one-process C0 up to summation order.
    """
    f = adapter.inner_size
    sums = {l: torch.zeros(f, f, dtype=torch.float64, device=adapter.layer_device(l)) for l in layers}
    rank, world = part
    mine = islice(enumerate(token_chunks(texts, tok, seq_len)), rank, n_chunks(n_tokens, seq_len), world)
    seen = 0
    bar = tqdm(total=n_tokens, desc="covariance", unit="tok", disable=not progress)
    while batch := list(islice(mine, batch_size)):
        ids = torch.tensor([chunk for _, chunk in batch])
        keys, _ = adapter.trace(ids, torch.ones_like(ids), key_layers=layers)
        take = sum(min(seq_len, n_tokens - i * seq_len) for i, _ in batch)
        for l in layers:
            _add_upper_gram(sums[l], keys[l].reshape(-1, f)[:take])
        seen += take
        bar.update(take)
    bar.close()
    if all_sum is not None:
        for s in sums.values():
            all_sum(s)
        seen = int(all_sum(torch.tensor(seen)))
    if seen == 0:
        raise EceError("the corpus produced no tokens", f"use a corpus with at least {seq_len} tokens")
    return {l: ((s.triu() + s.triu(1).T) / seen).cpu() for l, s in sums.items()}, seen


_GRAM_BLOCK = 384  # columns per block of `_add_upper_gram`; fastest of 1536/768/512/384/256 for SmolLM2


def estimate_covariance(
    adapter: ModelAdapter,
    tok: PreTrainedTokenizerBase,
    layers: list[int],
    cfg: CovarianceCfg,
    part: tuple[int, int] = (0, 1),
    all_sum: Callable[[Tensor], Tensor] | None = None,
) -> tuple[dict[int, Tensor], int]:
    """`second_moments` over the corpus, token budget, chunk length and batch size that params.yaml's
    `covariance` section names (the covariance stage's C0, and ece.edit's when none is given); `part`
    and `all_sum` as there."""
    return second_moments(
        adapter, tok, layers, corpus_texts(cfg.corpus), cfg.n_tokens, cfg.seq_len, cfg.batch_size, True, part, all_sum
    )


def n_chunks(n_tokens: int, seq_len: int) -> int:
    """How many corpus chunks hold `n_tokens` tokens: the covariance stage's items of work."""
    return -(-n_tokens // seq_len)


def _add_upper_gram(total: Tensor, k: Tensor) -> None:
    """Add kᵀk (k: tokens × f, float32) to the float64 `total`, on and above the diagonal blocks only.

    kᵀk is symmetric, so each block of rows is multiplied only with the columns from its diagonal
    on: 62 % of the full product's work for 4 blocks. The products are float32, half the time of
    float64 on CPU; the caller mirrors the upper triangle once at the end.
    """
    f = k.shape[1]
    for a in range(0, f, _GRAM_BLOCK):
        b = min(a + _GRAM_BLOCK, f)
        total[a:b, a:] += k[:, a:b].T @ k[:, a:]


META_KEY = "ece"  # one metadata key holding sorted JSON: safetensors writes several keys in a random order,
# which would give an identical recompute different bytes (and DVC a new hash for it)


def save_covariance(path: str | Path, moments: dict[int, Tensor], metadata: dict[str, str]) -> None:
    tensors = {f"layer.{l}": m.contiguous() for l, m in moments.items()}
    with atomic_path(path) as tmp:
        save_file(
            tensors, str(tmp), metadata={META_KEY: json.dumps({k: str(v) for k, v in metadata.items()}, sort_keys=True)}
        )


def load_covariance(path: str | Path, fingerprint: str, layers: list[int]) -> dict[int, Tensor]:
    """Load C0 for `layers`, refusing a file made for another model or without those layers."""
    path = Path(path)
    hint = "rerun the covariance stage (dvc repro covariance)"
    if not path.exists():
        raise EceError(f"covariance file not found: {path}", hint)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get(META_KEY, "{}"))
            names = set(f.keys())
            if meta.get("model_fingerprint") != fingerprint:
                raise EceError(
                    f"{path} was computed for another model (fingerprint {meta.get('model_fingerprint')}, "
                    f"this model is {fingerprint})",
                    hint,
                )
            missing = [l for l in layers if f"layer.{l}" not in names]
            if missing:
                raise EceError(f"{path} has no statistics for layers {missing}", hint)
            moments = {l: f.get_tensor(f"layer.{l}") for l in layers}
    except EceError:
        raise
    except Exception as exc:  # safetensors raises several types for a damaged file
        raise EceError(f"{path} is not a readable safetensors file ({exc})", hint) from None
    for l, m in moments.items():
        if not torch.isfinite(m).all():
            raise EceError(f"{path}: statistics of layer {l} contain NaN or Inf", hint)
    return moments
