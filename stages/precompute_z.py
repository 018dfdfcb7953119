"""Stage `precompute_z`: target hidden states z for every fact, on the ORIGINAL model.

Per batch, ECE's two steps (shared descent on each cluster's anchor, then a short per-fact descent,
both batched); MEMIT, AlphaEdit and ROME are the singleton-cluster case (ROME at its one layer),
and fine-tuning needs no z (the stage then writes an empty index). Results are cached per batch under a key of the
batch's content, its clusters, the z params, the model and the z code, so appending facts to the dataset only
computes z for the new batches (the output folder is `persist` in dvc.yaml for that reason).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import polars as pl
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ece.artifacts import CLUSTERS, Z_DIR, Z_TIMINGS
from ece.config import Params
from ece.data.codehash import code_hash
from ece.data.facts import batch_ranges, read_facts
from ece.data.io import atomic_path, sha256_json, write_json
from ece.edit.zvec import compute_z, warm_start_groups
from ece.methods import method_of
from ece.model.workbench import Workbench
from ece.stage import run_stage

Z_SECONDS = Path(".cache/z_seconds.json")  # machine-local: seconds each cached z file took to compute
INDEX_SCHEMA = {"id": pl.Utf8, "batch": pl.Int64, "file": pl.Utf8, "row": pl.Int64, "loss": pl.Float64,
                "nll": pl.Float64, "kl": pl.Float64, "delta_norm": pl.Float64, "steps": pl.Int64, "anchor": pl.Utf8}


def main(p: Params) -> None:
    df, facts = read_facts()
    clusters = pl.read_parquet(CLUSTERS / "clusters.parquet")
    wb = Workbench.open(p)
    method = method_of(p)
    top = method.layers[-1]
    cache = Z_DIR / "cache"
    rows, timings, used, computed = [], {}, set(), 0
    # Seconds are a fact of one run, not of the result: kept outside the cached z files, so that an
    # identical recompute writes identical bytes (and DVC reruns nothing downstream).
    seconds_of = json.loads(Z_SECONDS.read_text()) if Z_SECONDS.exists() else {}
    code = code_hash(Path(__file__))  # the z code: this script and every project module it imports
    for b, rng in enumerate(batch_ranges(len(facts), p.edit.batch_size) if method.needs_z else []):
        batch = [facts[i] for i in rng]
        info = clusters.filter(pl.col("batch") == b)
        assert info["id"].to_list() == [f.id for f in batch], "clusters are out of date; rerun dvc repro"
        position = {fid: j for j, fid in enumerate(info["id"].to_list())}
        labels, anchors = warm_start_groups(
            p.z.warm_start if method.clusters else "none", torch.tensor(info["cluster"].to_list()),
            torch.tensor(info.filter(pl.col("is_anchor")).sort("cluster")["id"].map_elements(
                position.get, return_dtype=pl.Int64).to_list()),
            [f.target_new for f in batch],
        )
        key = sha256_json({
            "facts": df["content_hash"][rng.start : rng.stop].to_list(), "labels": labels.tolist(),
            "anchors": anchors.tolist(), "z": asdict(p.z), "model": wb.fingerprint, "layer": top,
            "templates": wb.templates, "code": code,
        })
        path = cache / f"{key[:32]}.safetensors"
        used.add(path.name)
        if not path.exists():
            start = time.perf_counter()
            res = compute_z(wb.adapter, wb.tok, batch, top, wb.templates, labels, anchors, p.z)
            seconds = time.perf_counter() - start
            tensors = {"z": res.z, "h": res.h, "delta": res.delta, "loss": res.losses.total,
                       "nll": res.losses.nll, "kl": res.losses.kl, "steps": res.steps,
                       "anchor": anchors[labels]}
            with atomic_path(path) as tmp:
                save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp),
                          metadata={"ids": json.dumps([f.id for f in batch])})
            seconds_of[path.name] = seconds
            computed += 1
        timings[b] = seconds_of.get(path.name, float("nan"))  # NaN: reused from a cache made elsewhere
        with safe_open(str(path), framework="pt") as f:
            loss, nll, kl, delta, steps, anchor = (
                f.get_tensor(k) for k in ("loss", "nll", "kl", "delta", "steps", "anchor"))
        for j, fact in enumerate(batch):
            rows.append({
                "id": fact.id, "batch": b, "file": path.name, "row": j, "loss": float(loss[j]),
                "nll": float(nll[j]), "kl": float(kl[j]), "delta_norm": float(delta[j].norm()),
                "steps": int(steps[j]), "anchor": batch[int(anchor[j])].id,
            })
    for stale in cache.glob("*.safetensors"):
        if stale.name not in used:
            stale.unlink()
    table = pl.DataFrame(rows, schema=INDEX_SCHEMA)
    with atomic_path(Z_DIR / "index.parquet") as tmp:
        table.write_parquet(tmp)
    write_json(Z_SECONDS, {name: seconds_of[name] for name in sorted(used) if name in seconds_of})
    write_json(Z_TIMINGS, timings)
    if not method.needs_z:
        print(f"precompute_z: method {p.method} needs no z")
        return
    print(f"precompute_z: {len(facts)} facts, {computed} batches computed, {len(timings) - computed} reused; "
          f"mean target NLL {table['nll'].mean():.3f}, {table['steps'].sum()} z row-steps")


if __name__ == "__main__":
    run_stage(main)
