"""Stage `apply_edits`: write the batches into the model in dataset order, then save it.

Per batch and edited layer: keys on the current model, the residual spread over the remaining layers,
the restricted least-squares update on the batch's selected columns (ECE) or all columns (MEMIT), and
for ECE the cache P += K Kᵀ. Saves the edited model as a standard HF folder, each batch's changed
columns (before and after), and per-batch timings split by phase.
"""

from __future__ import annotations

import time

import polars as pl
import torch
from safetensors.torch import save_file
from torch import Tensor

from ece.attribution import batch_selection, neuron_scores
from ece.config import Params
from ece.covariance import load_covariance
from ece.editing import Editor, LayerChange
from ece.io import atomic_dir, write_json
from ece.keys import Fact, keys_and_hidden
from ece.models import save_model
from ece.pipeline import (ATTRIBUTION, CLUSTERS, COVARIANCE, EDITED, Z_DIR, Workbench, batch_ranges,
                          read_facts, read_timings, read_z)
from ece.stage import run_stage


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


def change_tensors(changes: dict[int, LayerChange]) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for l, c in changes.items():
        out[f"layer.{l}.cols"] = c.cols.contiguous()
        out[f"layer.{l}.old"] = c.old.contiguous()
        out[f"layer.{l}.new"] = c.new.contiguous()
    return out


def main(p: Params) -> None:
    df, facts = read_facts()
    wb = Workbench.open(p)
    layers = p.edit.layers
    c0 = load_covariance(COVARIANCE, wb.fingerprint, layers)
    editor = Editor(wb.adapter, wb.tok, layers, wb.templates, c0, p.update.mom2_update_weight, use_cache=p.method == "ece")
    ranges = batch_ranges(len(facts), p.edit.batch_size)
    columns: list[dict[int, Tensor] | None] = []
    for b, rng in enumerate(ranges):
        if p.method != "ece":
            columns.append(None)
        elif p.ece.scorer == "rs":  # on the original weights, before any batch is written
            columns.append(residual_columns(wb, p, [facts[i] for i in rng], *read_z(b)))
        else:
            columns.append(stored_columns(b, layers))
    phases = {
        "attribution": read_timings(ATTRIBUTION / "timings.json"),
        "clustering": read_timings(CLUSTERS / "timings.json"),
        "z": read_timings(Z_DIR / "timings.json"),
    }
    batch_rows, layer_rows = [], []
    with atomic_dir(EDITED) as tmp:
        for b, rng in enumerate(ranges):
            start = time.perf_counter()
            z, _ = read_z(b)
            changes = editor.apply_batch([facts[i] for i in rng], z, columns[b])
            seconds = time.perf_counter() - start
            save_file(change_tensors(changes), str(tmp / f"delta-batch-{b:04d}.safetensors"))
            for l, c in changes.items():
                layer_rows.append({"batch": b, "layer": l, "n_cols": len(c.cols), "delta_norm": float((c.new - c.old).norm())})
            row = {"batch": b, "n_facts": len(rng), "update": seconds}
            row |= {name: (t.get(b, 0.0) if p.method == "ece" or name == "z" else 0.0) for name, t in phases.items()}
            batch_rows.append(row)
            print(f"batch {b}: {len(rng)} facts, update {seconds:.1f} s")
        save_model(wb.model, wb.tok, tmp / "model")
        pl.DataFrame(layer_rows).write_parquet(tmp / "layers.parquet")
        pl.DataFrame(batch_rows).write_parquet(tmp / "batches.parquet")
    table = pl.DataFrame(batch_rows)
    phase_names = ["attribution", "clustering", "z", "update"]
    totals = {name: round(float(table[name].sum()), 2) for name in phase_names}
    write_json("reports/timings.json", {
        "method": p.method, "n_facts": len(facts), "n_batches": len(ranges), "batch_size": p.edit.batch_size,
        "seconds_total": totals, "seconds_per_batch": {k: round(v / len(ranges), 2) for k, v in totals.items()},
    })
    print(f"apply_edits: {len(facts)} facts in {len(ranges)} batches; seconds {totals}")


if __name__ == "__main__":
    run_stage(main)
