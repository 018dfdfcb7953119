"""Stage `apply_edits`: write the batches into the model in dataset order, then save it with its ledger.

Per batch and edited layer: keys on the current model, the residual spread over the remaining layers,
the method's update (ece.methods: ECE's restricted solve on the batch's selected columns, MEMIT's on
all columns, ROME's rank-one solve per fact, AlphaEdit's null-space solve, FT-L/FT-M's constrained
fine-tuning), and for ECE and AlphaEdit the cache P += K Kᵀ.

Crash safety: after every batch a checkpoint (ece.audit.checkpoint) is committed to `.cache/checkpoint/
apply_edits/`: the batch's changed columns, its ledger rows and P. A rerun after a kill at any moment
restores the finished batches from the stored columns onto the freshly loaded original weights (bit
for bit, nothing recomputed, no batch applied twice) and goes on with the next one. The checkpoint is
keyed by a hash of everything the run depends on, so one made from other inputs is ignored. The
outputs appear only at the end, in one atomic rename: artifacts/edited/ (the model as a standard HF
folder, the per-batch deltas, the ledger, per-batch/layer tables), then reports/ledger_runs.json (the
run facts of each batch: seconds per phase, session, git revision, finish time; kept out of the cached
artifacts/edited/ so that an identical recompute gives identical hashes), reports/ledger.md and
reports/timings.json. The checkpoint is deleted once they are in place.

Guards: a NaN/Inf update, one whose norm exceeds update.max_update_norm, or normal equations that are
not positive definite stop the stage with an error before anything is saved (the failing batch is
reverted; the finished ones stay in the checkpoint). The condition number of every solved system
goes into the ledger, with a warning above ece.audit.ledger.COND_WARN.

Test hook: ECE_TEST_BATCH_DELAY=<seconds> sleeps that long after each batch's checkpoint commit, so
that tests/test_resume.py can kill the process between two batches. Unset (the default), it does nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import polars as pl
import torch
from torch import Tensor

from ece.artifacts import (
    ATTRIBUTION,
    ATTRIBUTION_TIMINGS,
    CLUSTER_TIMINGS,
    CLUSTERS,
    COVARIANCE,
    EDITED,
    PREPARED,
    Z_DIR,
    Z_TIMINGS,
)
from ece.audit.checkpoint import Checkpoint
from ece.audit.ledger import (
    COND_WARN,
    LEDGER,
    LEDGER_MD,
    LEDGER_RUNS,
    LEDGER_SCHEMA,
    RUN_PHASES,
    delta_name,
    git_revision,
    layer_summary,
    ledger_markdown,
    params_hash,
    put_columns,
    write_provenance,
)
from ece.config import Params
from ece.data.codehash import code_hash
from ece.data.facts import Fact, batch_ranges, read_facts
from ece.data.io import atomic_dir, read_timings, sha256_file, sha256_json, write_json, write_text
from ece.data.loaders import dataset_hash
from ece.edit.attribution import batch_selection, neuron_scores
from ece.edit.covariance import load_covariance
from ece.edit.editor import Editor
from ece.edit.keys import keys_and_hidden
from ece.edit.zvec import read_z
from ece.errors import EceError
from ece.methods import method_of
from ece.model.loading import save_model
from ece.model.workbench import Workbench
from ece.stage import run_stage

# Outside DVC on purpose: a checkpoint is machine-local scratch state of one interrupted run, not a
# reproducible artifact (it is deleted on success and ignored when its key does not match).
CHECKPOINT = Path(".cache/checkpoint/apply_edits")


def stored_columns(batch: int, layers: list[int]) -> dict[int, Tensor]:
    table = pl.read_parquet(ATTRIBUTION / "batches.parquet").filter(pl.col("batch") == batch)
    return {r["layer"]: torch.tensor(r["selected"], dtype=torch.long) for r in table.iter_rows(named=True) if r["layer"] in layers}


def residual_columns(wb: Workbench, p: Params, batch: list[Fact], z: Tensor, h: Tensor) -> dict[int, Tensor]:
    """`rs` once z is known: score against the direction r = z − h the edit must move (original model)."""
    keys, _ = keys_and_hidden(wb.adapter, wb.tok, batch, wb.templates, p.edit.layers)
    return {
        l: batch_selection(
            neuron_scores(keys[l], wb.adapter.w_out_weight(l), "rs", z - h), p.ece.neuron_threshold, p.ece.aggregation
        )
        for l in p.edit.layers
    }


def run_key(p: Params, df: pl.DataFrame, fingerprint: str) -> str:
    """Hash of everything the run depends on: params, facts, upstream artifacts, model and code."""
    z_files = sorted(set(pl.read_parquet(Z_DIR / "index.parquet")["file"].to_list()))
    upstream = [ATTRIBUTION / "batches.parquet", CLUSTERS / "clusters.parquet"]
    return sha256_json({
        "params": {"method": asdict(method_of(p)), "model": asdict(p.model), "edit": asdict(p.edit), "ece": asdict(p.ece),
                   "z": [p.z.n_context, p.z.context_length], "update": asdict(p.update)},
        "facts": [list(r) for r in zip(df["id"].to_list(), df["content_hash"].to_list())],
        "covariance": sha256_file(COVARIANCE),
        "upstream": {str(f): sha256_file(f) if f.exists() else None for f in upstream},
        "z": {name: sha256_file(Z_DIR / "cache" / name) for name in z_files},
        "model": fingerprint,
        "code": code_hash(__file__),  # this script and every project module it imports
        "torch": torch.__version__,
    })


def read_dataset_hash(df: pl.DataFrame) -> str:
    meta = PREPARED.parent / "meta.json"
    return json.loads(meta.read_text())["dataset_hash"] if meta.exists() else dataset_hash(df)


def _hint_for(exc: EceError, p: Params) -> str | None:
    if "explodes" in str(exc.args[0]):
        return (f"{exc.hint}; or raise update.max_update_norm (now {p.update.max_update_norm:g}) if updates this "
                "large are expected. Nothing was saved; the finished batches are kept in the checkpoint")
    return exc.hint


def main(p: Params) -> None:
    df, facts = read_facts()
    wb = Workbench.open(p)
    method = method_of(p)
    layers = list(method.layers)
    c0 = load_covariance(COVARIANCE, wb.fingerprint, layers)
    editor = Editor(wb.adapter, wb.tok, method, wb.templates, c0, max_update_norm=p.update.max_update_norm)
    ranges = batch_ranges(len(facts), p.edit.batch_size)
    columns: list[dict[int, Tensor] | None] = []
    for b, rng in enumerate(ranges):  # on the original weights, before any batch is written
        if not method.selects_columns:
            columns.append(None)
        elif p.ece.scorer == "rs":
            columns.append(residual_columns(wb, p, [facts[i] for i in rng], *read_z(b)))
        else:
            columns.append(stored_columns(b, layers))
    phases = {
        "attribution": read_timings(ATTRIBUTION_TIMINGS),
        "clustering": read_timings(CLUSTER_TIMINGS),
        "z": read_timings(Z_TIMINGS),
    }
    clusters = pl.read_parquet(CLUSTERS / "clusters.parquet")
    z_index = pl.read_parquet(Z_DIR / "index.parquet")
    key = run_key(p, df, wb.fingerprint)
    common = {
        "method": p.method, "model": p.model.name, "model_fingerprint": wb.fingerprint,
        "dataset_hash": read_dataset_hash(df), "params_hash": params_hash(p), "checkpoint_key": key,
    }
    session, revision = uuid.uuid4().hex[:12], git_revision()

    checkpoint = Checkpoint(CHECKPOINT, key)
    done = checkpoint.resume()
    if done >= 0:
        for b in range(done + 1):
            put_columns(wb.adapter, checkpoint.delta(b), "new")
        if method.use_cache:
            editor.cache = checkpoint.cache()
        print(f"apply_edits: resuming from the checkpoint: batches 0..{done} restored, {len(ranges) - done - 1} to go")
    delay = float(os.environ.get("ECE_TEST_BATCH_DELAY", "0") or 0)

    for b in range(done + 1, len(ranges)):
        batch = [facts[i] for i in ranges[b]]
        z = read_z(b)[0] if method.needs_z else None
        start = time.perf_counter()
        try:
            changes = editor.apply_batch(batch, z, columns[b])
        except EceError as exc:
            raise EceError(f"batch {b}: {exc.args[0]}", _hint_for(exc, p)) from None
        seconds = time.perf_counter() - start
        info = clusters.filter(pl.col("batch") == b)
        zrows = z_index.filter(pl.col("batch") == b).sort("row")
        assert info["id"].to_list() == [f.id for f in batch], "stale upstream artifacts; rerun dvc repro"
        assert not method.needs_z or zrows["id"].to_list() == info["id"].to_list(), "stale z; rerun dvc repro"
        fact_info = {
            "n_facts": len(batch), "fact_ids": [f.id for f in batch],
            "content_hashes": df["content_hash"][ranges[b].start : ranges[b].stop].to_list(),
            "clusters": info["cluster"].to_list(), "anchor_ids": info["anchor_id"].to_list(),
            "z_loss": zrows["loss"].to_list(), "z_nll": zrows["nll"].to_list(),
            "z_steps": zrows["steps"].to_list(), "z_start": zrows["anchor"].to_list(),
        }
        phase_seconds = {name: (t.get(b, 0.0) if method.selects_columns or name == "z" else 0.0) for name, t in phases.items()}
        ledger_rows, layer_rows = [], []
        for l, c in changes.items():
            cond = c.cond
            if cond > COND_WARN:
                print(f"warning: batch {b}, layer {l}: ill-conditioned solve (condition number {cond:.3g})")
            summary = layer_summary(c)
            layer_rows.append({"batch": b, "layer": l, "n_cols": summary["n_neurons"], "delta_norm": summary["delta_norm"]})
            ledger_rows.append({"batch": b, "layer": l, **fact_info, **summary, "cond": cond, **common})
        rows = {
            "batch": {"batch": b, "n_facts": len(batch)},
            "run": {"batch": b, "n_facts": len(batch), **phase_seconds, "update": seconds,
                    **{f"update_{k}": v for k, v in editor.seconds.items()},
                    "z_row_steps": int(zrows["steps"].sum()) if method.needs_z else 0, "session": session,
                    "git_revision": revision, "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds")},
            "layers": layer_rows,
            "ledger": ledger_rows,
        }
        checkpoint.commit(b, changes, rows, editor.cache if method.use_cache else None)
        print(f"batch {b}: {len(batch)} facts, update {seconds:.1f} s", flush=True)
        if delay > 0:
            time.sleep(delay)

    stored = [checkpoint.rows(b) for b in range(len(ranges))]
    runs = [r["run"] for r in stored]
    ledger = pl.DataFrame([row for r in stored for row in r["ledger"]], schema=LEDGER_SCHEMA)
    with atomic_dir(EDITED) as tmp:
        for b in range(len(ranges)):
            _link_or_copy(checkpoint.delta_path(b), tmp / delta_name(b))
        save_model(wb.model, wb.tok, tmp / "model")
        write_provenance(tmp / "model", {"base_model": p.model.name, "base_fingerprint": wb.fingerprint,
                                         "batches": len(ranges), "checkpoint_key": key})
        pl.DataFrame([row for r in stored for row in r["layers"]]).write_parquet(tmp / "layers.parquet")
        pl.DataFrame([r["batch"] for r in stored]).write_parquet(tmp / "batches.parquet")
        ledger.write_parquet(tmp / LEDGER.name)
    write_json(LEDGER_RUNS, runs)
    write_text(LEDGER_MD, ledger_markdown(ledger, {r["batch"]: r for r in runs}))
    totals = {name: round(sum(r[name] for r in runs), 2) for name in RUN_PHASES}
    write_json("reports/timings.json", {
        "method": p.method, "n_facts": len(facts), "n_batches": len(ranges), "batch_size": p.edit.batch_size,
        "seconds_total": totals, "seconds_per_batch": {k: round(v / len(ranges), 2) for k, v in totals.items()},
    })
    checkpoint.clear()
    print(f"apply_edits: {len(facts)} facts in {len(ranges)} batches; seconds {totals}; ledger in {LEDGER_MD}")


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


if __name__ == "__main__":
    run_stage(main)
