"""Report rows read from finished DVC experiments: what the benchmark reports (scale, compare, sweep,
gemma3_compare) share when they turn an experiment's metrics, timings and ledger into a table row."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def fmt(x: Any, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def mean_general(summary: dict[str, Any]) -> float | None:
    """Mean accuracy over the general-ability tasks of one evaluation (None when none ran)."""
    accs = [m["accuracy"] for m in (summary.get("general") or {}).values() if m.get("accuracy") is not None]
    return sum(accs) / len(accs) if accs else None


def code_of(rev: str) -> str | None:
    """The commit an experiment ran from (its commit's parent): which code produced the row."""
    out = subprocess.run(["git", "rev-parse", "--short", f"{rev}^"], cwd=ROOT, capture_output=True, text=True)
    return out.stdout.strip() or None


def merge(
    stored: list[dict[str, Any]], found: list[dict[str, Any]], order: list[str], keep_earlier: bool = False
) -> list[dict[str, Any]]:
    """The report's rows: every finished experiment, plus the stored rows whose experiments this repository
    no longer holds (experiments live in one machine's git refs; a row run elsewhere or in an earlier
    session survives only in the report's JSON, with its experiment commit in `rev`). A row found again
    replaces its stored version; with `keep_earlier`, a stored version that ran from other code stays as
    `<row>@<code>` (an earlier default's result is evidence, not a stale copy), listed after its row.
    Ordered as `order` lists the rows (others last, in their own order)."""
    by_row = {r["row"]: r for r in stored}
    for r in found:
        earlier = by_row.get(r["row"])
        if keep_earlier and earlier is not None and not same_commit(earlier.get("code"), r.get("code")):
            by_row[f"{r['row']}@{earlier.get('code')}"] = {**earlier, "row": f"{r['row']}@{earlier.get('code')}"}
        by_row[r["row"]] = r

    def place(row: str) -> tuple[int, int]:
        base = row.split("@", 1)[0]
        return (order.index(base) if base in order else len(order), row != base)

    return sorted(by_row.values(), key=lambda r: place(r["row"]))


def same_commit(a: str | None, b: str | None) -> bool:
    """Whether two abbreviated commit names name the same commit (git lengthens its abbreviations as
    a repository grows, so one may be a prefix of the other)."""
    if not a or not b:
        return a == b
    return a.startswith(b) or b.startswith(a)


def experiment_row(r: dict[str, Any]) -> dict[str, Any]:
    """What every report keeps of one finished experiment (`experiments.results`' value): the commit it
    ran as and the code it ran from, its size, its metrics before and after, its seconds per batch and
    its z row-steps. Each report adds its own fields (the row's name first)."""
    m = r["metrics"]
    return {
        "rev": r["rev"],
        "code": code_of(r["rev"]),
        "n_facts": m["n_facts"],
        "batch_size": (r["params"] or {}).get("edit", {}).get("batch_size"),
        "pre": m["pre"],
        "post": m["post"],
        "seconds_per_batch": (r["timings"] or {}).get("seconds_per_batch", {}),
        "z_row_steps": z_row_steps(r["runs"]),
    }


def cost_cells(r: dict[str, Any]) -> list[str]:
    """A report row's cost as table cells: z row-steps, z seconds per batch (see `z_seconds`) and the
    update's seconds per batch."""
    sec = r["seconds_per_batch"]
    return [
        "–" if r.get("z_row_steps") is None else str(r["z_row_steps"]),
        z_seconds(sec, r.get("z_row_steps")),
        fmt(seconds_of(sec.get("update")), 1),
    ]


def z_row_steps(runs: list[dict[str, Any]] | None) -> int | None:
    """z row-steps over all batches (one row = one fact in one forward/backward of the z descent): the
    cost of z that does not depend on what else ran on the machine. None when the runs record none (a run
    without ledger_runs.json); a method without z (UltraEdit) records 0 per batch."""
    steps = [b["z_row_steps"] for b in runs or [] if "z_row_steps" in b]
    return sum(steps) if steps else None


def seconds_of(x: Any) -> float | None:
    """A phase's seconds as the timings file holds them; None for the NaN of a phase this run did not
    compute (z reused from the scratch cache: DVC writes NaN, read back from YAML as a string)."""
    return float(x) if isinstance(x, (int, float)) and x == x else None


def edit_seconds(seconds: dict[str, Any]) -> float | None:
    """Seconds of editing proper (every phase apply_edits times: attribution, clustering, z, update);
    None when a phase was not computed in this run."""
    parts = [seconds_of(v) for v in seconds.values()]
    return None if None in parts else sum(parts)  # type: ignore[arg-type]


def z_seconds(sec: dict[str, Any], row_steps: int | None) -> str:
    """z's seconds per batch (attribution and clustering included) as a table cell: `reused` when this run
    took its z batches from the scratch cache (another run computed them), `–` for a method without z."""
    z = seconds_of(sec.get("z"))
    if z is not None:
        return fmt(z + (seconds_of(sec.get("attribution")) or 0.0) + (seconds_of(sec.get("clustering")) or 0.0), 1)
    return "reused" if row_steps else "–"
