"""The DVC stages' side of the edit sequence: the plan's parts written to and read back from artifacts.

The stages compute a plan (ece.api) one part per stage, so that each part is cached by DVC and a
change reruns only the parts it touches: attribute → artifacts/attribution, cluster →
artifacts/clusters, precompute_z → artifacts/z (cached per batch by content, so appended facts
compute z only for the new batches). apply_edits reads them back into `BatchPlan`s, runs
`ece.sequence.apply_plans` with a checkpoint, and writes artifacts/edited in one atomic rename.
Everything here is about those files; the computations are ece.editing's. (precompute_z's z cache
is ece.editing.zcache, so that the z stage does not depend on the update code.)
"""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any

import polars as pl
import torch

from ece.artifacts import (
    ATTRIBUTION,
    ATTRIBUTION_TIMINGS,
    CLUSTER_TIMINGS,
    CLUSTERS,
    COVARIANCE,
    EDITED,
    EDITOR,
    PREPARED,
    SCRATCH,
    Z_DIR,
    Z_TIMINGS,
)
from ece.audit.checkpoint import Checkpoint
from ece.audit.ledger import (
    LEDGER,
    LEDGER_MD,
    LEDGER_RUNS,
    LEDGER_SCHEMA,
    RUN_PHASES,
    delta_name,
    ledger_markdown,
    write_provenance,
)
from ece.config import Params
from ece.data.facts import Fact, batch_ranges, batch_rows
from ece.data.io import (
    atomic_dir,
    link_or_copy,
    read_timings,
    sha256_file,
    sha256_json,
    sha256_tree,
    write_json,
    write_text,
)
from ece.data.loaders import dataset_hash
from ece.editing.selection import update_columns
from ece.editing.serac import MEMORY_DIR, EditMemory
from ece.editing.zcache import read_z
from ece.methods import Method, method_of
from ece.model.loading import save_model
from ece.model.workbench import Workbench
from ece.sequence import BatchPlan

# Outside DVC on purpose: checkpoints are machine-local state (one folder per lineage, kept after a run for
# incremental apply, restored only where the prefix keys match), not reproducible artifacts.
CHECKPOINT = SCRATCH / "checkpoint" / "apply_edits"


def read_plans(wb: Workbench, p: Params, df: pl.DataFrame, facts: list[Fact]) -> list[BatchPlan]:
    """Every batch's plan from the upstream artifacts (attribution, clusters, z), checked against the facts."""
    method = method_of(p)
    clusters = pl.read_parquet(CLUSTERS / "clusters.parquet")
    z_index = pl.read_parquet(Z_DIR / "index.parquet")
    selections = pl.read_parquet(ATTRIBUTION / "batches.parquet")
    timings = {
        "attribution": read_timings(ATTRIBUTION_TIMINGS),
        "clustering": read_timings(CLUSTER_TIMINGS),
        "z": read_timings(Z_TIMINGS),
    }
    plans = []
    for b, rng in enumerate(batch_ranges(len(facts), p.edit.batch_size)):
        batch = [facts[i] for i in rng]
        info = batch_rows(clusters, b)
        zrows = z_index.filter(pl.col("batch") == b).sort("row")
        assert [r["id"] for r in info] == [f.id for f in batch], "stale upstream artifacts; rerun dvc repro"
        assert not method.needs_z or zrows["id"].to_list() == [f.id for f in batch], "stale z; rerun dvc repro"
        z, h = read_z(z_index, b) if method.needs_z else (None, None)
        seconds = {k: (t.get(b, 0.0) if method.selects_columns or k == "z" else 0.0) for k, t in timings.items()}
        plans.append(
            BatchPlan(
                batch,
                df["content_hash"][rng.start : rng.stop].to_list(),
                info,
                z,
                zrows.select("loss", "nll", "kl", "delta_norm", "steps", "anchor", "earlier", "predicted").to_dicts(),
                update_columns(wb, p, method, batch, batch_rows(selections, b), z, h),
                seconds,
            )
        )
    return plans


def lineage_key(p: Params, method: Method, fingerprint: str, code: str) -> str:
    """Hash of everything an apply_edits run depends on except its facts and their plans: params,
    covariance, trained editor, model and code. Runs of one lineage share a checkpoint folder
    (ece.sequence.prefix_keys)."""
    return sha256_json(
        {
            "params": {
                "method": asdict(method),
                "model": asdict(p.model),
                "edit": asdict(p.edit),
                "ece": asdict(p.ece),
                "z": [p.z.n_context, p.z.context_length],
                "update": asdict(p.update),
            },
            "covariance": sha256_file(COVARIANCE),
            "editor": sha256_tree(EDITOR) if EDITOR.exists() else None,
            "model": fingerprint,
            "code": code,
            "torch": torch.__version__,
        }
    )


def read_dataset_hash(df: pl.DataFrame) -> str:
    meta = PREPARED.parent / "meta.json"
    return json.loads(meta.read_text())["dataset_hash"] if meta.exists() else dataset_hash(df)


def write_edited(
    wb: Workbench,
    p: Params,
    checkpoint: Checkpoint,
    stored: list[dict[str, Any]],
    n_facts: int,
    memory: EditMemory | None = None,
) -> dict[str, float]:
    """artifacts/edited (model, per-batch deltas, ledger, tables; a memory method's edit memory inside the
    model folder, which then holds the whole edited model) in one atomic rename, then the uncached
    reports (ledger runs, ledger.md, timings.json); total seconds per phase."""
    runs = [r["run"] for r in stored]
    ledger = pl.DataFrame([row for r in stored for row in r["ledger"]], schema=LEDGER_SCHEMA)
    with atomic_dir(EDITED) as tmp:
        for b in range(len(stored)):
            link_or_copy(checkpoint.delta_path(b), tmp / delta_name(b))
        save_model(wb.model, wb.tok, tmp / "model")
        write_provenance(
            tmp / "model",
            {
                "base_model": p.model.name,
                "base_fingerprint": wb.fingerprint,
                "batches": len(stored),
                "checkpoint_key": checkpoint.prefix_keys[-1],
            },
        )
        if memory is not None:
            memory.save(tmp / "model" / MEMORY_DIR)
        pl.DataFrame([row for r in stored for row in r["layers"]]).write_parquet(tmp / "layers.parquet")
        pl.DataFrame([r["batch"] for r in stored]).write_parquet(tmp / "batches.parquet")
        ledger.write_parquet(tmp / LEDGER.name)
    write_json(LEDGER_RUNS, runs)
    write_text(LEDGER_MD, ledger_markdown(ledger, {r["batch"]: r for r in runs}))
    totals = {name: round(sum(r[name] for r in runs), 2) for name in RUN_PHASES}
    write_json(
        "reports/timings.json",
        {
            "method": p.method,
            "n_facts": n_facts,
            "n_batches": len(stored),
            "batch_size": p.edit.batch_size,
            "seconds_total": totals,
            "seconds_per_batch": {k: round(v / len(stored), 2) for k, v in totals.items()},
        },
    )
    return totals
