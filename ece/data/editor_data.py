"""The records a trained editor (MEND, SERAC) learns from: selected by id from a dataset file, split into
training and held-out records, and kept apart from the facts being edited.

An editor that has seen an edited fact in training (its prompt, its paraphrase, its target) would
report generalization it never had to earn, so the training records are chosen by id range
(train_editor.id_range), a record whose fact also occurs outside the range in the same file is left
out (CounterFact repeats a few facts under other case ids: 7 of 10000-19999 reappear in 0-9999), and
every fact of an edit run is checked against the training records by its fact key.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import polars as pl

from ece.config import DataCfg, TrainEditorCfg
from ece.data.facts import Fact
from ece.data.io import sha256_json
from ece.data.loaders import load_edits
from ece.errors import EceError

_TRAILING_NUMBER = re.compile(r"(\d+)$")
FIX = "dvc repro train_editor"


@dataclass(frozen=True)
class TrainingRecord:
    """One training edit: the fact, a paraphrase to generalise to, and a prompt that must keep its answer."""

    fact: Fact
    paraphrase: str  # full text with the subject written out
    neighborhood: str  # full text about another subject
    neighborhood_answer: str
    paraphrases: tuple[str, ...] = ()  # every paraphrase of the record (SERAC's in-scope queries)
    neighborhoods: tuple[str, ...] = ()  # every neighbourhood prompt (SERAC's hard out-of-scope queries)


def id_number(fact_id: str) -> int | None:
    """The number an id ends with (counterfact:123 → 123, zsre:7 → 7), None when it ends otherwise."""
    match = _TRAILING_NUMBER.search(fact_id)
    return int(match.group(1)) if match else None


def fact_key(subject: str, prompt: str, target_new: str) -> str:
    """What makes two records the same edit, whatever their file, id or extra prompts."""
    return sha256_json([subject, prompt, target_new])[:16]


def fact_keys(df: pl.DataFrame) -> list[str]:
    return [fact_key(*r) for r in df.select("subject", "prompt", "target_new").iter_rows()]


def training_table(cfg: TrainEditorCfg) -> tuple[pl.DataFrame, int]:
    """The records of `cfg.data` whose id number lies in `cfg.id_range`, in file order, less those whose
    fact occurs outside the range too (so an edit run on the rest of the file never meets a training
    fact), and how many were left out for that. Each must have a "{}" prompt, a paraphrase and a
    neighbourhood prompt with its answer."""
    df = load_edits(DataCfg(edit_dataset=cfg.data, format=cfg.format))
    numbers = [id_number(i) for i in df["id"].to_list()]
    if None in numbers:
        bad = df["id"][numbers.index(None)]
        raise EceError(
            f"{cfg.data}: record id {bad!r} ends with no number, so train_editor.id_range cannot select it",
            "give the training records ids that end with a number (e.g. train:17)",
        )
    first, last = cfg.id_range
    inside = pl.Series([first <= n <= last for n in numbers])  # type: ignore[operator]
    keys = pl.Series(fact_keys(df))
    outside = set(keys.filter(~inside).to_list())
    selected = df.filter(inside & ~keys.is_in(list(outside)))
    dropped = int(inside.sum()) - selected.height
    if selected.height <= cfg.heldout:
        raise EceError(
            f"train_editor.id_range {list(cfg.id_range)} selects {selected.height} records of {cfg.data}, "
            f"not more than train_editor.heldout ({cfg.heldout})",
            f"widen train_editor.id_range or lower train_editor.heldout, then {FIX}",
        )
    unusable = selected.filter(
        ~pl.col("prompt").str.contains("{}", literal=True)
        | (pl.col("paraphrase_prompts").list.len() == 0)
        | (pl.col("neighborhood_prompts").list.len() == 0)
        | pl.coalesce("neighborhood_target", "target_true").is_null()
    )
    if unusable.height:
        raise EceError(
            f"{unusable.height} training record(s) lack a '{{}}' prompt, a paraphrase or a neighbourhood prompt "
            f"with its answer, e.g. {unusable['id'].head(5).to_list()}",
            "train on records with all three (CounterFact, zsRE), or narrow train_editor.id_range",
        )
    return selected, dropped


def training_records(df: pl.DataFrame) -> list[TrainingRecord]:
    return [
        TrainingRecord(
            Fact.from_row(r),
            r["paraphrase_prompts"][0],
            r["neighborhood_prompts"][0],
            r["neighborhood_target"] or r["target_true"],
            tuple(r["paraphrase_prompts"]),
            tuple(r["neighborhood_prompts"]),
        )
        for r in df.iter_rows(named=True)
    ]


def check_disjoint(train_keys: set[str], edits: pl.DataFrame) -> None:
    """Refuse to edit facts the editor was trained on (same subject, prompt and target)."""
    shared = [i for i, k in zip(edits["id"].to_list(), fact_keys(edits)) if k in train_keys]
    if shared:
        raise EceError(
            f"the trained editor was trained on {len(shared)} of the facts being edited, e.g. {shared[:5]}",
            f"set train_editor.id_range (or train_editor.data) to records that are not edited, then {FIX}",
        )
