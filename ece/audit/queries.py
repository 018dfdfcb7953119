"""The audit queries behind `ece audit` and `ece rollback`: what the ledger and the deltas say about a
fact, a neuron, the whole weight diff, and the model with batches undone. They return plain dicts (the
CLI renders them as tables or JSON); a problem the user can fix raises EceError with a hint."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import polars as pl
import torch

from ece.artifacts import ATTRIBUTION, EDITED, PREPARED, ROUTING
from ece.audit.ledger import (
    LEDGER,
    delta_files,
    load_deltas,
    read_delta,
    read_ledger,
    read_provenance,
    read_runs,
    rollback,
    write_provenance,
)
from ece.config import Params
from ece.editing.serac import MEMORY_DIR
from ece.errors import EceError
from ece.model.adapter import ModelAdapter
from ece.model.loading import load_for, load_model, model_fingerprint, save_model

EDITED_MODEL = EDITED / "model"


def _fact_table() -> pl.DataFrame | None:
    return pl.read_parquet(PREPARED) if PREPARED.exists() else None


def _fact_selections() -> pl.DataFrame | None:
    path = ATTRIBUTION / "facts.parquet"
    return pl.read_parquet(path) if path.exists() else None


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


# --- audit --------------------------------------------------------------------------------------


def audit_fact(fact_id: str, top: int = 5) -> dict[str, Any]:
    ledger = read_ledger()
    rows = ledger.filter(pl.col("fact_ids").list.contains(fact_id)).sort("layer")
    if rows.is_empty():
        examples = ", ".join(ledger["fact_ids"][0][:3]) if ledger.height else ""
        raise EceError(
            f"fact '{fact_id}' is not in the ledger {LEDGER}", f"use an id of the prepared dataset, e.g. {examples}"
        )
    first = rows.row(0, named=True)
    i = first["fact_ids"].index(fact_id)
    cluster = first["clusters"][i]
    members = [fid for fid, c in zip(first["fact_ids"], first["clusters"]) if c == cluster]
    result: dict[str, Any] = {
        "fact": fact_id,
        "batch": first["batch"],
        "n_facts_in_batch": first["n_facts"],
        "cluster": cluster,
        "anchor": first["anchor_ids"][i],
        "is_anchor": first["anchor_ids"][i] == fact_id,
        "cluster_members": members,
        "content_hash": first["content_hashes"][i],
        "z_loss": first["z_loss"][i] if first["z_loss"] else None,
        "z_nll": first["z_nll"][i] if first["z_nll"] else None,
        "z_steps": first["z_steps"][i] if first["z_steps"] else None,
        "z_start": first["z_start"][i] if first["z_start"] else None,
        "z_earlier": first["z_earlier"][i] if first["z_earlier"] else 0,
        "z_predicted": first["z_predicted"][i] if first["z_predicted"] else 0,
        "dataset_hash": first["dataset_hash"],
        "params_hash": first["params_hash"],
        "git_revision": read_runs().get(first["batch"], {}).get("git_revision"),  # None: no run record here
    }
    facts = _fact_table()
    if facts is not None:
        match = facts.filter(pl.col("id") == fact_id)
        if match.height:
            r = match.row(0, named=True)
            result["request"] = {k: r[k] for k in ("subject", "prompt", "target_new", "target_true")}
    selections = _fact_selections()
    layers = []
    for r in rows.filter(pl.col("layer").is_not_null()).iter_rows(named=True):  # null: a batch that wrote no layer
        norms = dict(zip(r["neurons"], r["col_norms"]))
        own = None
        if selections is not None:
            sel = selections.filter((pl.col("id") == fact_id) & (pl.col("layer") == r["layer"]))
            own = sel["selected"][0].to_list() if sel.height else None
        pool = [n for n in (own if own is not None else r["neurons"]) if n in norms]
        ranked = sorted(pool, key=lambda n: -norms[n])[:top]
        layers.append(
            {
                "layer": r["layer"],
                "batch_neurons": r["n_neurons"],
                "delta_norm": r["delta_norm"],
                "max_col_norm": max(r["col_norms"]) if r["col_norms"] else 0.0,
                "cond": _finite(r["cond"]),
                "fact_neurons": len(own) if own is not None else None,
                "fact_neurons_changed": len([n for n in own if n in norms]) if own is not None else None,
                "top_neurons": [{"neuron": n, "col_norm": norms[n]} for n in ranked],
            }
        )
    result["layers"] = layers
    memory = EDITED_MODEL / MEMORY_DIR / "memory.parquet"
    if memory.exists():  # SERAC: the fact is a memory entry; which evaluated texts it answered
        entry = pl.read_parquet(memory).filter(pl.col("id") == fact_id)
        routing = pl.read_parquet(ROUTING) if ROUTING.exists() else None
        result["memory"] = {
            "statement": entry["statement"][0] if entry.height else None,
            "batch": entry["batch"][0] if entry.height else None,
            "answered": routing.filter(pl.col("memory_id") == fact_id)["text"].to_list()
            if routing is not None
            else None,
        }
    result["batch_delta_norm"] = math.sqrt(sum(l["delta_norm"] ** 2 for l in layers))
    return result


def audit_neuron(layer: int, neuron: int) -> dict[str, Any]:
    ledger = read_ledger()
    rows = ledger.filter(pl.col("layer") == layer).sort("batch")
    if rows.is_empty():
        raise EceError(f"layer {layer} was not edited", f"edited layers: {sorted(set(ledger['layer'].to_list()))}")
    selections = _fact_selections()
    batches = []
    for r in rows.iter_rows(named=True):
        if neuron not in r["neurons"]:
            continue
        norm = r["col_norms"][r["neurons"].index(neuron)]
        selecting = None
        if selections is not None:
            sel = selections.filter(
                pl.col("id").is_in(r["fact_ids"])
                & (pl.col("layer") == layer)
                & pl.col("selected").list.contains(neuron)
            )
            selecting = sel["id"].to_list()
        batches.append(
            {
                "batch": r["batch"],
                "col_norm": norm,
                "n_facts": r["n_facts"],
                "fact_ids": r["fact_ids"],
                "facts_selecting_it": selecting,
            }
        )
    result: dict[str, Any] = {
        "layer": layer,
        "neuron": neuron,
        "n_batches": len(batches),
        "batches": batches,
        "net_change_norm": 0.0,
    }
    if batches:
        first, last = (
            read_delta(delta_files()[batches[0]["batch"]])[layer],
            read_delta(delta_files()[batches[-1]["batch"]])[layer],
        )
        old = first.old[:, first.cols.tolist().index(neuron)].double()
        new = last.new[:, last.cols.tolist().index(neuron)].double()
        result["net_change_norm"] = float((new - old).norm())
        result["original_col_norm"] = float(old.norm())
    return result


def audit_diff(p: Params) -> dict[str, Any]:
    if not EDITED_MODEL.exists():
        raise EceError(f"{EDITED_MODEL} not found", "run the apply_edits stage first")
    original, _ = load_for(p)
    edited, _ = load_for(p, str(EDITED_MODEL))
    prov = read_provenance(EDITED_MODEL)
    if prov and prov.get("base_fingerprint") not in (None, model_fingerprint(original)):
        raise EceError(
            f"{EDITED_MODEL} was not made from model.name '{p.model.name}' (it says '{prov.get('base_model')}')",
            "set model.name in params.yaml to the model the pipeline edited",
        )
    deltas = load_deltas()
    a_orig, a_edit = ModelAdapter(original), ModelAdapter(edited)
    w_out_names = {a_orig.w_out_name(l): l for l in range(a_orig.n_layers)}
    sd_o, sd_e = original.state_dict(), edited.state_dict()
    changed = [n for n in sd_o if n not in sd_e or sd_o[n].shape != sd_e[n].shape or not torch.equal(sd_o[n], sd_e[n])]
    changed += [n for n in sd_e if n not in sd_o]
    writers: dict[int, dict[int, list[int]]] = {}
    for b, changes in enumerate(deltas):
        for l, c in changes.items():
            for col in c.cols.tolist():
                writers.setdefault(l, {}).setdefault(col, []).append(b)
    layers, other = [], []
    for name in changed:
        if name not in w_out_names:
            other.append(name)
            continue
        l = w_out_names[name]
        w_o, w_e = a_orig.w_out_weight(l), a_edit.w_out_weight(l)
        cols = (w_o != w_e).any(dim=0).nonzero().squeeze(1).tolist()
        by_batch: dict[int, int] = {}
        unattributed, mapping = [], {}
        for col in cols:
            bs = writers.get(l, {}).get(col, [])
            ok = False
            if bs:
                c = deltas[bs[-1]][l]
                ok = torch.equal(w_e[:, col], c.new[:, c.cols.tolist().index(col)].to(w_e))
            if ok:
                by_batch[bs[-1]] = by_batch.get(bs[-1], 0) + 1
                mapping[col] = bs
            else:
                unattributed.append(col)
        layers.append(
            {
                "layer": l,
                "tensor": name,
                "changed_columns": len(cols),
                "attributed": len(cols) - len(unattributed),
                "unattributed": unattributed,
                "last_written_by_batch": {str(b): n for b, n in sorted(by_batch.items())},
                "columns": {str(c): bs for c, bs in mapping.items()},
            }
        )
    return {
        "original": p.model.name,
        "edited": str(EDITED_MODEL),
        "n_batches": len(deltas),
        "tensors_compared": len(sd_o),
        "tensors_changed": changed,
        "layers": sorted(layers, key=lambda x: x["layer"]),
        "other_changed_tensors": other,
        "all_attributed": not other and all(not x["unattributed"] for x in layers),
    }


# --- rollback -----------------------------------------------------------------------------------


def do_rollback(batches: int | None, to_batch: int | None, out: Path) -> dict[str, Any]:
    if not EDITED_MODEL.exists():
        raise EceError(f"{EDITED_MODEL} not found", "run the apply_edits stage first")
    if out.resolve() == EDITED.resolve() or EDITED.resolve() in out.resolve().parents:
        raise EceError(
            f"--out {out} is inside {EDITED}", f"{EDITED} is a DVC output and is never modified; write elsewhere"
        )
    deltas = load_deltas()
    n = len(deltas)
    if batches is not None:
        if not 1 <= batches <= n:
            raise EceError(f"--batches {batches} is out of range: there are {n} batches", f"use 1..{n}")
        to_batch = n - 1 - batches
    assert to_batch is not None
    model, tok = load_model(str(EDITED_MODEL), dtype=None)  # kept in the dtype it was saved in
    undone = rollback(ModelAdapter(model), deltas, to_batch)
    save_model(model, tok, out)
    prov = read_provenance(EDITED_MODEL) or {}
    write_provenance(
        out, {**prov, "batches": to_batch + 1, "rolled_back_from": str(EDITED_MODEL), "undone_batches": undone}
    )
    restored: dict[int, set[int]] = {}
    for b in undone:
        for l, c in deltas[b].items():
            restored.setdefault(l, set()).update(c.cols.tolist())
    return {
        "from": str(EDITED_MODEL),
        "out": str(out),
        "n_batches": n,
        "to_batch": to_batch,
        "undone_batches": undone,
        "restored_columns": {str(l): len(s) for l, s in sorted(restored.items())},
    }
