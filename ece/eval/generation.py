"""Generation metrics of an edit: fluency (n-gram entropy) and consistency (TF-IDF cosine).

Definitions (SPEC "Evaluation protocol", MEMIT's `test_generation`):

- Generation: for each generation prompt, one sample of `max_new_tokens` new tokens, top-k sampling
  (MEMIT's `generate_fast` samples with top_k = 5, temperature 1), batched with LEFT padding and an
  attention mask, after the tokenizer's document start (`ece.model.prompts.document_start`: SmolLM2 needs
  <|endoftext|> before a prompt). Prompt i draws from its own random stream, seeded by (seed, i), so a
  run is reproducible, a text does not depend on how the prompts are batched or shared out, and the
  pre- and post-edit models draw the same noise for the same prompt. The metrics read the WHOLE text,
  prompt included, as MEMIT does.
- `ngram_entropy(text, n)`: Shannon entropy in bits of the frequency distribution of the n-grams of
  the whitespace tokens of `text` (`text.split()`; MEMIT uses nltk.word_tokenize), i.e.
  H_n = -Σ_g p(g) log2 p(g), p(g) = count(g) / #n-grams. 0 when the text has fewer than n tokens.
- Fluency of one text = the MEAN of the two weighted entropies (2/3·H2 and 4/3·H3), i.e.
  (2/3·H2 + 4/3·H3) / 2 = H2/3 + 2·H3/3 (MEMIT's `compute_n_gram_entropy`: np.mean of the weighted
  list). `fluency(texts)` = 100 × the mean over texts. A text of k distinct words scores
  ≈ 100·log2(k) (≈ 630 for 90 distinct words); repetitive, degenerate text scores low.
- Consistency of a fact = cosine similarity of the TF-IDF vectors of (all its generations joined
  with spaces) and (its reference texts joined with spaces). The vectorizer is sklearn's
  TfidfVectorizer with a fixed vocabulary, as MEMIT uses it: lower-cased tokens of the pattern
  `\\b\\w\\w+\\b` (2+ word characters), raw term counts × idf, terms outside the vocabulary ignored.
  0 when either vector is empty.

References for consistency, two sources:
1. MEMIT's files (evaluate.attribute_snippets, evaluate.idf, evaluate.tfidf_vocab): the snippets of
   Wikipedia articles about subjects with the same (relation_id, target_new id) as the fact, and
   MEMIT's IDF table. Needs relation and target ids, which only MEMIT's multi_counterfact.json has
   (looked up by case_id); facts without them fall back to 2.
2. APPROXIMATE, from the shipped Wikipedia lead paragraphs (data/corpus/wikipedia_vital_summaries_en):
   IDF table and vocabulary built from that corpus (sklearn's smoothed idf = ln((1+N)/(1+df)) + 1,
   every term of the corpus in the vocabulary; ~2 s, computed in memory, no cache), and as reference
   text for target_new, at most `n_articles` (default 5) articles:
   a. the article(s) whose title equals target_new, case-insensitively, also ignoring a trailing
      parenthetical qualifier of the title ("Mercury (planet)" matches "mercury");
   b. then articles whose lead paragraph mentions target_new as a whole phrase (not inside a longer
      word; case as written when target_new has a capital letter, e.g. "Dodge" but not "dodge",
      otherwise case-insensitive), most mentions first, ties in corpus order.
   No article at all: the fact's consistency is null. These references are articles ABOUT or
   MENTIONING the new object, not MEMIT's snippets about other subjects sharing the (relation, object),
   so the scores are comparable between pre and post of one run but not to published numbers; every
   report labels them "approximate".
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from transformers import LogitsProcessor, LogitsProcessorList, PreTrainedTokenizerBase

from ece.errors import EceError
from ece.eval.scoring import Router, routed
from ece.model import distributed
from ece.model.loading import device_of
from ece.model.prompts import document_start

FLUENCY_WEIGHTS = {2: 2 / 3, 3: 4 / 3}
_TERM = re.compile(r"(?u)\b\w\w+\b")  # sklearn's default token_pattern


# ---------------------------------------------------------------------------------------------
# Generation


class RowStreamTopK(LogitsProcessor):
    """Top-k sampling (temperature 1) in which each row draws from its OWN random stream.

    A row's next token is argmax over its k most probable tokens of (logit + Gumbel noise): the
    Gumbel-max trick, an exact sample from the softmax of those k logits. The noise of row j comes from
    `streams[j]`, k draws per step whatever the other rows do, so a prompt's text depends on its stream
    and on the model alone: not on the batch size, the order of the batches, or which process of a
    torchrun world samples it. Used with greedy decoding (`do_sample=False`), which takes the argmax.
    """

    def __init__(self, streams: list[torch.Generator], top_k: int) -> None:
        self.streams, self.top_k = streams, top_k

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        k = min(self.top_k, scores.shape[-1])
        top, where = scores.float().topk(k, dim=-1)
        uniform = torch.stack([torch.rand(k, generator=g) for g in self.streams]).to(scores.device)
        gumbel = -torch.log(-torch.log(uniform))  # uniform 0 -> -inf: that token is never drawn
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(-1, where, (top + gumbel).to(scores.dtype))


def prompt_stream(seed: int, index: int) -> torch.Generator:
    """The random stream of the `index`-th prompt of a run seeded with `seed`: the pre- and post-edit
    models draw the same noise for the same prompt. (torch's CPU generator keeps 32 bits of a seed:
    distinct for up to a million prompts per seed.)"""
    return torch.Generator().manual_seed((seed * 1_000_003 + index) % 2**32)


@torch.no_grad()
def generate(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    prompts: list[str],
    max_new_tokens: int = 40,
    seed: int = 0,
    batch_size: int = 128,
    top_k: int = 5,
    router: Router | None = None,
) -> list[str]:
    """One sampled continuation per prompt; returns prompt + continuation as text, in prompt order
    (`router`: the model reads each prompt after its context, which the returned text leaves out).

    Prompt i samples from its own stream (`prompt_stream(seed, i)`, `RowStreamTopK`), so the texts do
    not depend on `batch_size` (up to float rounding of the logits): prompts are batched in order of
    length (less padding), and under torchrun each process samples every world_size-th batch and the
    texts are gathered.
    """
    if not prompts:
        return []
    start = document_start(tok)
    rows = [start + list(tok(p).input_ids) for p in routed(prompts, router)]
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    mine: dict[int, str] = {}
    device = device_of(model)
    for s in distributed.shard(range(0, len(order), batch_size)):
        idx = order[s : s + batch_size]
        width = max(len(rows[i]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for j, i in enumerate(idx):  # left padding: every row's last prompt token is at width-1
            ids[j, width - len(rows[i]) :] = torch.tensor(rows[i])
            mask[j, width - len(rows[i]) :] = 1
        sampler = RowStreamTopK([prompt_stream(seed, i) for i in idx], top_k)
        gen = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            logits_processor=LogitsProcessorList([sampler]),
            pad_token_id=pad,
        )
        for j, i in enumerate(idx):
            mine[i] = prompts[i] + tok.decode(gen[j, width:].tolist(), skip_special_tokens=True)
    texts = {i: t for part in distributed.all_objects(mine) for i, t in part.items()}
    return [texts[i] for i in range(len(prompts))]


# ---------------------------------------------------------------------------------------------
# Fluency


def ngram_entropy(text: str, n: int) -> float:
    """Entropy in bits of the n-gram frequency distribution of the whitespace tokens of `text`."""
    words = text.split()
    grams = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
    total = sum(grams.values())
    if total == 0:
        return 0.0
    return float(-sum((c / total) * math.log2(c / total) for c in grams.values()))


def text_fluency(text: str) -> float:
    """(2/3·H2 + 4/3·H3) / 2 for one text, in bits (not yet × 100)."""
    return sum(w * ngram_entropy(text, n) for n, w in FLUENCY_WEIGHTS.items()) / len(FLUENCY_WEIGHTS)


def fluency(texts: list[str]) -> float | None:
    """100 × the mean over texts of (2/3·H2 + 4/3·H3) / 2 (None for no text)."""
    if not texts:
        return None
    return 100.0 * sum(text_fluency(t) for t in texts) / len(texts)


# ---------------------------------------------------------------------------------------------
# TF-IDF


def terms(text: str) -> list[str]:
    """sklearn TfidfVectorizer's default analyzer: lower-case, tokens of 2+ word characters."""
    return _TERM.findall(text.lower())


@dataclass
class TfIdf:
    """A fixed vocabulary (term → column) and its idf weights."""

    vocab: dict[str, int]
    idf: np.ndarray

    def vector(self, text: str) -> dict[int, float]:
        """Sparse tf·idf vector (raw counts × idf) of the in-vocabulary terms of `text`."""
        counts = Counter(self.vocab[t] for t in terms(text) if t in self.vocab)
        return {j: c * float(self.idf[j]) for j, c in counts.items()}

    def cosine(self, a: str, b: str) -> float:
        va, vb = self.vector(a), self.vector(b)
        na = math.sqrt(sum(v * v for v in va.values()))
        nb = math.sqrt(sum(v * v for v in vb.values()))
        if na == 0 or nb == 0:
            return 0.0
        return sum(v * vb[j] for j, v in va.items() if j in vb) / (na * nb)


def build_tfidf(docs: list[str]) -> TfIdf:
    """Vocabulary = every term of `docs`; idf = ln((1 + N) / (1 + df)) + 1 (sklearn, smooth_idf)."""
    df: Counter[str] = Counter()
    for d in docs:
        df.update(set(terms(d)))
    vocab = {t: j for j, t in enumerate(sorted(df))}
    n = len(docs)
    idf = np.array([math.log((1 + n) / (1 + df[t])) + 1.0 for t in sorted(df)], dtype=np.float64)
    return TfIdf(vocab, idf)


def load_tfidf(idf_path: str | Path, vocab_path: str | Path) -> TfIdf:
    """MEMIT's idf.npy + tfidf_vocab.json (no pickles: allow_pickle=False)."""
    try:
        idf = np.load(idf_path, allow_pickle=False)
        vocab = json.loads(Path(vocab_path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise EceError(
            f"cannot read the TF-IDF files {idf_path}, {vocab_path}: {exc}",
            "point evaluate.idf / evaluate.tfidf_vocab at MEMIT's idf.npy and tfidf_vocab.json",
        ) from None
    if not isinstance(vocab, dict) or idf.ndim != 1 or (vocab and max(vocab.values()) >= len(idf)):
        raise EceError(
            f"{vocab_path} does not match {idf_path}", "use the idf.npy and tfidf_vocab.json shipped together"
        )
    return TfIdf({str(k): int(v) for k, v in vocab.items()}, idf.astype(np.float64))


def consistency(generations: list[str], references: list[str], tfidf: TfIdf) -> float | None:
    """TF-IDF cosine of the joined generations and the joined references (None without either)."""
    if not generations or not references:
        return None
    return tfidf.cosine(" ".join(generations), " ".join(references))


# ---------------------------------------------------------------------------------------------
# References


@dataclass
class WikiReferences:
    """The shipped Wikipedia lead paragraphs, indexed for finding articles about a target."""

    titles: list[str]
    texts: list[str]
    n_articles: int = 5
    _by_title: dict[str, list[int]] = field(default_factory=dict, repr=False)
    _by_term: dict[str, set[int]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        for i, (title, text) in enumerate(zip(self.titles, self.texts)):
            for key in {title.lower(), re.sub(r"\s*\([^)]*\)\s*$", "", title).lower()}:
                self._by_title.setdefault(key, []).append(i)
            for t in set(terms(text)):
                self._by_term.setdefault(t, set()).add(i)

    @classmethod
    def load(cls, path: str | Path, n_articles: int = 5) -> WikiReferences:
        titles, texts = [], []
        try:
            with open(path, encoding="utf-8") as f:
                for line in f:
                    if line.strip():
                        rec = json.loads(line)
                        titles.append(str(rec["title"]))
                        texts.append(str(rec["text"]))
        except (OSError, ValueError, KeyError) as exc:
            raise EceError(
                f"cannot read the reference corpus {path}: {exc}",
                'evaluate.reference_corpus must be a JSONL of {"title", "text"}',
            ) from None
        return cls(titles, texts, n_articles)

    def articles(self, target: str) -> list[int]:
        """Indices of the reference articles for `target` (title matches first, then mentions)."""
        key = target.strip().lower()
        if not key:
            return []
        chosen = list(dict.fromkeys(self._by_title.get(key, [])))[: self.n_articles]
        words = terms(key)
        if words:
            candidates = set.intersection(*(self._by_term.get(w, set()) for w in words))
        else:
            candidates = set(range(len(self.texts)))
        flags = 0 if any(c.isupper() for c in target) else re.IGNORECASE  # proper nouns: as written
        pattern = re.compile(r"(?<!\w)" + re.escape(target.strip()) + r"(?!\w)", flags)
        mentions = [(-len(pattern.findall(self.texts[i])), i) for i in candidates if i not in chosen]
        for count, i in sorted(mentions):
            if len(chosen) >= self.n_articles or count == 0:
                break
            chosen.append(i)
        return chosen

    def references(self, target: str) -> list[str]:
        return [self.texts[i] for i in self.articles(target)]

    def tfidf(self) -> TfIdf:
        return build_tfidf(self.texts)


def load_snippets(path: str | Path) -> dict[tuple[str, str], list[str]]:
    """MEMIT's attribute_snippets.json: (relation_id, target_id) → snippet texts."""
    try:
        items = json.loads(Path(path).read_text(encoding="utf-8"))
        out: dict[tuple[str, str], list[str]] = {}
        for el in items:
            out.setdefault((str(el["relation_id"]), str(el["target_id"])), []).extend(
                str(s["text"]) for s in el["samples"]
            )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise EceError(
            f"cannot read attribute snippets {path}: {exc}",
            "point evaluate.attribute_snippets at MEMIT's attribute_snippets.json",
        ) from None
    return out


def counterfact_keys(path: str | Path) -> dict[str, tuple[str, str]]:
    """`counterfact:<case_id>` → (relation_id, target_new id), from MEMIT's multi_counterfact.json.

    Empty for any other shape (the compact EasyEdit shape has no ids).
    """
    try:
        records = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    out: dict[str, tuple[str, str]] = {}
    if isinstance(records, list):
        for rec in records:
            rw = rec.get("requested_rewrite") if isinstance(rec, dict) else None
            if isinstance(rw, dict) and "relation_id" in rw and isinstance(rw.get("target_new"), dict):
                tid = rw["target_new"].get("id")
                if tid is not None:
                    out[f"counterfact:{rec.get('case_id')}"] = (str(rw["relation_id"]), str(tid))
    return out


# ---------------------------------------------------------------------------------------------
# Per fact


@dataclass
class References:
    """The vectorizer and, per fact, the reference texts consistency compares generations with."""

    tfidf: TfIdf
    texts: list[list[str]]
    sources: list[str | None]  # "snippets" (MEMIT's), "wikipedia" (approximate) or None (no reference)

    @property
    def approximate(self) -> bool:
        return any(s != "snippets" for s in self.sources)


def fact_references(
    targets: list[str],
    ids: list[str],
    corpus: str | Path,
    n_articles: int = 5,
    snippets: str | Path | None = None,
    idf: str | Path | None = None,
    tfidf_vocab: str | Path | None = None,
    dataset: str | Path | None = None,
) -> References:
    """References for every fact: MEMIT's snippets where the files are given and the fact's relation and
    target ids are known (from MEMIT's multi_counterfact.json `dataset`), else the Wikipedia articles of
    `WikiReferences.articles` (approximate)."""
    wiki: WikiReferences | None = None
    texts: list[list[str]] = []
    sources: list[str | None] = []
    if snippets is not None and idf is not None and tfidf_vocab is not None:
        tfidf = load_tfidf(idf, tfidf_vocab)
        snips = load_snippets(snippets)
        keys = counterfact_keys(dataset) if dataset is not None else {}
    else:
        tfidf, snips, keys = None, {}, {}  # type: ignore[assignment]
    for fid, target in zip(ids, targets):
        found = snips.get(keys[fid], []) if fid in keys else []
        if found:
            texts.append(found)
            sources.append("snippets")
            continue
        if wiki is None:
            wiki = WikiReferences.load(corpus, n_articles)
        refs = wiki.references(target)
        texts.append(refs)
        sources.append("wikipedia" if refs else None)
    if tfidf is None:
        tfidf = (wiki or WikiReferences.load(corpus, n_articles)).tfidf()
    return References(tfidf, texts, sources)


def spread(n: int, k: int) -> list[int]:
    """`k` of the indices 0..n-1 spread evenly (every (n/k)-th, from 0); all of them when k is 0 or >= n.

    Sampling is the costliest metric per fact (a forward pass per new token), so a large run samples
    for an evenly spread, deterministic subset, the same for the pre and the post model."""
    if k <= 0 or k >= n:
        return list(range(n))
    return [i * n // k for i in range(k)]


def generation_metrics(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    prompts: list[list[str]],
    refs: References,
    max_new_tokens: int = 40,
    top_k: int = 5,
    seed: int = 0,
    batch_size: int = 128,
    router: Router | None = None,
) -> tuple[list[float | None], list[float | None], list[list[str]]]:
    """Per fact: fluency (×100), consistency, and the generated texts; None for a fact without prompts.

    `prompts[i]` are the generation prompts of fact i (already cut to the number wanted). All prompts
    of all facts are sampled in one batched run.
    """
    flat = [q for qs in prompts for q in qs]
    texts = generate(model, tok, flat, max_new_tokens, seed, batch_size, top_k, router)
    flu: list[float | None] = []
    con: list[float | None] = []
    gens: list[list[str]] = []
    s = 0
    for i, qs in enumerate(prompts):
        mine = texts[s : s + len(qs)]
        s += len(qs)
        gens.append(mine)
        flu.append(fluency(mine))
        con.append(consistency(mine, refs.texts[i], refs.tfidf))
    return flu, con, gens
