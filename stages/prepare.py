"""Stage `prepare`: read the edit dataset, validate it, and publish the canonical table only if it passes.

A failing dataset leaves the previous artifacts/prepared/ and reports/validation.md as they were and
writes reports/validation_errors.md instead, so downstream stages never see a half-checked table.
"""

from __future__ import annotations

from pathlib import Path

from ece.config import Params
from ece.data.io import atomic_dir, sha256_file, write_json, write_text
from ece.data.loaders import dataset_hash, load_edits, source_format
from ece.data.validation import validate_edits
from ece.errors import EceError
from ece.stage import run_stage

PREPARED = Path("artifacts/prepared")
REPORT = Path("reports/validation.md")
ERRORS = Path("reports/validation_errors.md")


def main(p: Params) -> None:
    cfg = p.data
    try:
        df = load_edits(cfg)
    except EceError as exc:
        write_text(ERRORS, f"# Edit dataset could not be read\n\n- file: `{cfg.edit_dataset}`\n\n```\n{exc}\n```\n")
        raise
    result = validate_edits(df, cfg.max_chars)
    meta = {
        "dataset_hash": dataset_hash(df),
        "n_rows": df.height,
        "format": source_format(df),
        "source": {"path": cfg.edit_dataset, "sha256": sha256_file(cfg.edit_dataset)},
        "n_facts": cfg.n_facts,
    }
    context = {"file": cfg.edit_dataset, "format": meta["format"], "dataset hash": meta["dataset_hash"]}
    if not result.ok:
        write_text(ERRORS, result.to_markdown(context))
        raise EceError(
            f"{cfg.edit_dataset}: {len(result.failures)} validation rule(s) failed:\n{result.summary()}",
            f"fix those rows (details in {ERRORS}); the previous prepared data was left untouched",
        )
    with atomic_dir(PREPARED) as tmp:
        df.write_parquet(tmp / "edits.parquet")
        write_json(tmp / "meta.json", meta)
    write_text(REPORT, result.to_markdown(context))
    ERRORS.unlink(missing_ok=True)
    print(
        f"prepare: {df.height} facts ({meta['format']}), all {len(result.rules)} rules passed, hash {meta['dataset_hash'][:12]}"
    )


if __name__ == "__main__":
    run_stage(main)
