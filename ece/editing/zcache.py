"""The z cache of the precompute_z stage (artifacts/z): one safetensors file per window of
`z.window_batches` batches, named by a hash of everything its z depends on, and a per-fact index; read
back by apply_edits.

A file whose key matches is reused, so appending facts to the dataset computes z only for the new
batches (and those of the last window, when it was short), and a change of z params, model or z code
computes every batch again.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import polars as pl
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from ece.artifacts import CLUSTERS, SCRATCH, Z_DIR, Z_TIMINGS
from ece.config import Params
from ece.data.facts import Fact, batch_ranges, batch_rows, batch_windows
from ece.data.io import atomic_path, link_or_copy, sha256_bytes, sha256_json, write_json
from ece.editing.zvec import (
    EarlierObjects,
    FactLosses,
    ZResult,
    batch_z,
    window_cluster_rows,
    window_shares,
    window_start,
    z_rows,
)
from ece.errors import EceError
from ece.methods import method_of
from ece.model.workbench import Workbench

Z_SECONDS = SCRATCH / "z_seconds.json"  # machine-local: seconds each cached z file took to compute
Z_STORE = SCRATCH / "z"  # machine-local copies of every z file, shared by workspaces (ECE_SCRATCH)
INDEX_SCHEMA = {
    "id": pl.Utf8,
    "batch": pl.Int64,
    "file": pl.Utf8,
    "row": pl.Int64,
    "loss": pl.Float64,
    "nll": pl.Float64,
    "kl": pl.Float64,
    "delta_norm": pl.Float64,
    "steps": pl.Int64,
    "anchor": pl.Utf8,
    "earlier": pl.Int64,
    "predicted": pl.Int64,
}
TENSORS = ("z", "h", "delta", "loss", "nll", "kl", "steps", "anchor", "earlier", "predicted")  # of one batch's z file


def precompute_z(
    wb: Workbench, p: Params, df: pl.DataFrame, facts: list[Fact], code: str
) -> tuple[pl.DataFrame, int, float | None]:
    """z of every window of `z.window_batches` batches into artifacts/z/cache (one file per window, named
    by a hash of the window's content, groups, z params, model, `code` and, with z.warm_from_earlier, the
    δ its anchors start from, which earlier windows' files determine; an existing file is reused) and the
    per-fact index; the index, the number of batches computed (the others were reused) and the factor a
    predicted start would take after the last batch (`ColdStarts.gain_now`; None: none predicted).

    A window's facts are one z batch (`batch_z`): its passes hold the facts of all its batches still
    optimising, so the tail of one batch (its slowest facts) runs alongside the start of the next, and a
    fact warm-starts from the window's first fact with its object even when that one is in an earlier
    batch of the window. Every batch's z is on the original model, so this changes no fact's problem;
    the update still runs batch by batch. A window's seconds are shared among its batches in proportion
    to their z row-steps."""
    clusters = pl.read_parquet(CLUSTERS / "clusters.parquet")
    method = method_of(p)
    cache = Z_DIR / "cache"
    rows, timings, used, computed = [], {}, set(), 0
    # Seconds are a fact of one run, not of the result: kept outside the cached z files, so that a
    # recompute giving the same z writes identical bytes (and DVC reruns nothing downstream). On one
    # thread it always does; on several, threaded sums can differ in the last bits (reports/determinism.md).
    seconds_of = json.loads(Z_SECONDS.read_text()) if Z_SECONDS.exists() else {}
    history = EarlierObjects.of(p, method, wb)
    ranges = batch_ranges(len(facts), p.edit.batch_size) if method.needs_z else []
    for window in batch_windows(len(ranges), p.z.window_batches):
        span = range(ranges[window[0]].start, ranges[window[-1]].stop)
        batch = [facts[i] for i in span]
        cluster_rows = window_cluster_rows([batch_rows(clusters, b) for b in window])
        labels, anchors, starts = window_start(p, method, history, cluster_rows, batch, wb.adapter.hidden_size)
        key = sha256_json(
            {
                "facts": df["content_hash"][span.start : span.stop].to_list(),
                "batches": [len(ranges[b]) for b in window],
                "labels": labels.tolist(),
                "anchors": anchors.tolist(),
                "z": asdict(p.z),
                "model": wb.fingerprint,
                "layer": method.layers[-1],
                "templates": wb.templates,
                "code": code,
                "start": sha256_bytes(starts.delta.numpy().tobytes()) if starts.delta is not None else None,
            }
        )
        path = cache / f"{key[:32]}.safetensors"
        used.add(path.name)
        if not path.exists() and (Z_STORE / path.name).exists():
            link_or_copy(Z_STORE / path.name, path)  # computed by another workspace on this machine
        if not path.exists():
            start = time.perf_counter()
            res = batch_z(wb, p, method, batch, labels, anchors, starts.delta)
            tensors = {
                "z": res.z,
                "h": res.h,
                "delta": res.delta,
                "loss": res.losses.total,
                "nll": res.losses.nll,
                "kl": res.losses.kl,
                "steps": res.steps,
                "anchor": anchors[labels],
                "earlier": starts.earlier,
                "predicted": starts.predicted,
            }
            with atomic_path(path) as tmp:
                save_file(
                    {k: v.contiguous() for k, v in tensors.items()},
                    str(tmp),
                    metadata={"ids": json.dumps([f.id for f in batch])},
                )
            seconds_of[path.name] = time.perf_counter() - start
            computed += len(window)
            link_or_copy(path, Z_STORE / path.name)
        stored, delta = _stored_z(path, batch)
        seconds = seconds_of.get(path.name, float("nan"))  # NaN: reused from a cache made elsewhere
        shares = window_shares([len(ranges[b]) for b in window], [r["steps"] for r in stored], seconds)
        for b, (cut, share) in zip(window, shares):
            rows += [
                {"id": batch[j].id, "batch": b, "file": path.name, "row": j, **stored[j]}
                for j in range(cut.start, cut.stop)
            ]
            timings[b] = share
        history.add(batch, delta)  # as stored, so a later window's key follows this file's bytes
    for stale in cache.glob("*.safetensors"):
        if stale.name not in used:
            stale.unlink()
    table = pl.DataFrame(rows, schema=INDEX_SCHEMA)
    with atomic_path(Z_DIR / "index.parquet") as tmp:
        table.write_parquet(tmp)
    write_json(Z_SECONDS, seconds_of)
    write_json(Z_TIMINGS, timings)
    return table, computed, history.cold.gain_now() if history.cold is not None else None


def _stored_z(path: Path, batch: list[Fact]) -> tuple[list[dict[str, Any]], Tensor]:
    """The per-fact rows (`z_rows`) and δ (n, d) of one stored batch."""
    with safe_open(str(path), framework="pt") as f:
        t = {k: f.get_tensor(k) for k in TENSORS}
    res = ZResult(t["z"], t["delta"], t["h"], FactLosses(t["loss"], t["nll"], t["kl"]), t["steps"])
    return z_rows(res, batch, t["anchor"], t["earlier"], t["predicted"]), t["delta"]


def read_z(index: pl.DataFrame, batch: int) -> tuple[Tensor, Tensor]:
    """z and h (n, d) of one batch, in the batch's fact order, from the precompute_z cache (`index`: its
    index.parquet, read once by the caller for every batch). A batch's rows lie in one window's file."""
    index = index.filter(pl.col("batch") == batch)
    if index.is_empty():
        raise EceError(f"no z for batch {batch}", "rerun the precompute_z stage: dvc repro precompute_z")
    rows = index["row"].to_torch()
    with safe_open(str(Z_DIR / "cache" / index["file"][0]), framework="pt") as f:
        return f.get_tensor("z")[rows], f.get_tensor("h")[rows]
