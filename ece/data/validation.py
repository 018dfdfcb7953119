"""Data-quality gate for the canonical edit table, as a Great Expectations suite.

GE has no polars source, so the table goes in as a pandas frame: text columns with object dtype (so
that GE checks the Python type of every value) plus derived columns for what GE cannot look into,
the list columns (longest element, bad elements) and the case/space-normalised targets. Every rule
reports the offending rows by id, so a failed run says exactly what to fix.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from functools import cache
from typing import Any, NamedTuple

import pandas as pd
import polars as pl

from ece.data.loaders import LIST_FIELDS, MAX_LISTED, REQUIRED_COLUMNS, SCHEMA, TEXT_FIELDS, row_label
from ece.errors import EceError

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")  # offline: no usage statistics

import great_expectations as gx  # noqa: E402  (reads GX_ANALYTICS_ENABLED at import)
import great_expectations.expectations as gxe  # noqa: E402
from great_expectations.data_context.types.base import (  # noqa: E402
    DataContextConfig,
    InMemoryStoreBackendDefaults,
    ProgressBarsConfig,
)

logging.getLogger("great_expectations").setLevel(logging.ERROR)

# One {} and no second one anywhere (the text may span lines).
PLACEHOLDER_REGEX = r"^(?:(?!\{\})[\s\S])*\{\}(?:(?!\{\})[\s\S])*$"
_OPTIONAL_TEXT = ("target_true", "neighborhood_target")


class Failure(NamedTuple):
    rule: str
    description: str
    rows: list[str]  # the first MAX_LISTED offending rows as '#<index> <id>' (see ece.data.loaders.row_label)
    count: int


@dataclass(frozen=True)
class ValidationResult:
    n_rows: int
    rules: list[tuple[str, str]]  # every rule checked: (name, description)
    failures: list[Failure]

    @property
    def ok(self) -> bool:
        return not self.failures

    def summary(self) -> str:
        """One line per failed rule, for the terminal."""
        return "\n".join(f"  {f.rule}: {f.description}: {f.count} row(s): {_rows(f)}" for f in self.failures)

    def to_markdown(self, context: dict[str, Any] | None = None) -> str:
        """A readable report: verdict, `context` lines (file, hash...), then every rule and its rows."""
        failed = {f.rule: f for f in self.failures}
        verdict = "all rules passed" if self.ok else f"FAILED: {len(self.failures)} of {len(self.rules)} rules"
        lines = [
            "# Edit dataset validation",
            "",
            f"- result: **{verdict}**",
            f"- rows: {self.n_rows}",
            *(f"- {k}: `{v}`" for k, v in (context or {}).items()),
            f"- rules checked: {len(self.rules)}",
            "",
            "| rule | requirement | result | rows |",
            "|---|---|---|---|",
        ]
        for name, description in sorted(self.rules, key=lambda rule: rule[0] not in failed):  # failures first
            f = failed.get(name)
            result = f"failed ({f.count})" if f else "passed"
            lines.append(f"| {name} | {_cell(description)} | {result} | {_cell(_rows(f)) if f else ''} |")
        return "\n".join(lines) + "\n"


def validate_edits(df: pl.DataFrame, max_chars: int) -> ValidationResult:
    """Check the canonical edit table against every data rule; never raises for bad rows."""
    missing = [c for c in SCHEMA if c not in df.columns]
    if missing:
        raise EceError(f"edit table lacks column(s) {', '.join(missing)}", "build it with ece.data.loaders.load_edits")
    rules = _rules(max_chars)
    suite = gx.ExpectationSuite(name="edits", expectations=[exp for _, _, exp in rules])
    batch = _batch_definition().get_batch(batch_parameters={"dataframe": _frame(df)})
    results = batch.validate(suite, result_format={"result_format": "COMPLETE"}).results
    ids = df["id"].to_list()
    described = {name: description for name, description, _ in rules}
    failures = []
    for r in results:
        if r.success:
            continue
        name = r.expectation_config.meta["rule"]
        description = described[name]
        crash = r.exception_info or {}
        if crash.get("raised_exception"):
            description += f" (check crashed: {crash.get('exception_message')})"
        index = r.result.get("unexpected_index_list")
        index = list(range(len(ids))) if index is None else [int(i) for i in index]  # whole-column failure
        failures.append(Failure(name, description, [row_label(i, ids[i]) for i in index[:MAX_LISTED]], len(index)))
    return ValidationResult(df.height, [(n, d) for n, d, _ in rules], failures)


def _rules(max_chars: int) -> list[tuple[str, str, Any]]:
    """(name, description, expectation) for every rule; the name rides along in the expectation's meta."""
    rules: list[tuple[str, str, Any]] = []

    def add(name: str, description: str, expectation_type: Any, **kwargs: Any) -> None:
        rules.append((name, description, expectation_type(meta={"rule": name}, **kwargs)))

    for col in ("id", *REQUIRED_COLUMNS):
        add(f"{col}_present", f"{col} is given", gxe.ExpectColumnValuesToNotBeNull, column=col)
    for col in ("id", *REQUIRED_COLUMNS, *_OPTIONAL_TEXT):
        add(
            f"{col}_not_blank",
            f"{col} is not empty or only spaces (when given)",
            gxe.ExpectColumnValuesToMatchRegex,
            column=col,
            regex=r"\S",
        )
    add("id_unique", "ids are unique", gxe.ExpectColumnValuesToBeUnique, column="id")
    add(
        "prompt_one_placeholder",
        'prompt contains exactly one "{}" for the subject (counterfact_compact/zsRE: the prompt must contain its subject)',
        gxe.ExpectColumnValuesToMatchRegex,
        column="prompt",
        regex=PLACEHOLDER_REGEX,
    )
    add(
        "targets_differ",
        "target_new differs from target_true (ignoring case and spacing)",
        gxe.ExpectSelectColumnValuesToBeUniqueWithinRecord,
        column_list=["_target_new_norm", "_target_true_norm"],
        ignore_row_if="any_value_is_missing",
    )
    for col in TEXT_FIELDS:
        add(f"{col}_is_text", f"{col} is a string", gxe.ExpectColumnValuesToBeOfType, column=col, type_="str")
        add(
            f"{col}_max_chars",
            f"{col} has at most {max_chars} characters",
            gxe.ExpectColumnValueLengthsToBeBetween,
            column=col,
            max_value=max_chars,
        )
    for col in LIST_FIELDS:
        add(
            f"{col}_elements",
            f"{col} holds only non-empty strings",
            gxe.ExpectColumnValuesToBeBetween,
            column=f"_{col}_bad",
            max_value=0,
        )
        add(
            f"{col}_max_chars",
            f"every {col} text has at most {max_chars} characters",
            gxe.ExpectColumnValuesToBeBetween,
            column=f"_{col}_longest",
            max_value=max_chars,
        )
    return rules


def _frame(df: pl.DataFrame) -> pd.DataFrame:
    """The pandas view GE checks: raw text values plus the derived columns the rules need."""
    columns: dict[str, Any] = {c: pd.Series(df[c].to_list(), dtype=object) for c in TEXT_FIELDS}
    for col in ("target_new", "target_true"):
        columns[f"_{col}_norm"] = pd.Series([_norm(v) for v in df[col].to_list()], dtype=object)
    for col in LIST_FIELDS:
        lists = [v if isinstance(v, list) else [] for v in df[col].to_list()]
        columns[f"_{col}_bad"] = [sum(not (isinstance(e, str) and e.strip()) for e in v) for v in lists]
        columns[f"_{col}_longest"] = [max((len(e) for e in v if isinstance(e, str)), default=0) for v in lists]
    return pd.DataFrame(columns)


def _norm(value: Any) -> Any:
    return " ".join(value.casefold().split()) if isinstance(value, str) else None


@cache
def _batch_definition() -> Any:
    """One in-memory GE context per process: creating it is the slow part of a validation."""
    context = gx.get_context(
        mode="ephemeral",
        project_config=DataContextConfig(
            store_backend_defaults=InMemoryStoreBackendDefaults(),
            analytics_enabled=False,
            progress_bars=ProgressBarsConfig(globally=False),
        ),
    )
    asset = context.data_sources.add_pandas("edits").add_dataframe_asset("edits")
    return asset.add_batch_definition_whole_dataframe("whole table")


def _rows(f: Failure | None) -> str:
    if f is None:
        return ""
    return ", ".join(f.rows) + (f" ... (+{f.count - len(f.rows)} more)" if f.count > len(f.rows) else "")


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")
