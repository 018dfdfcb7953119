"""`ece`: audit, roll back, edit and compare models from the command line.

    ece audit --fact ID                 the batch, cluster, anchor, layers, neurons and size of the change of a fact
    ece audit --layer L --neuron N      the batches/facts that changed column N of W_out at layer L, and by how much
    ece audit --diff                    which weights differ between model.name and artifacts/edited/model,
                                        every changed column attributed to the batch that wrote it
    ece rollback --batches N | --to-batch B [--out DIR]
                                        the edited model with the last N batches undone (or as right after
                                        batch B; -1 = original), bit for bit, as a new HF folder
    ece edit --subject S --prompt "{} is located in the city of" --new Rome [--model M] [--out DIR]
                                        edit one fact into a model in seconds; before/after completions
    ece generate --prompt TEXT [--model A] [--compare B]
                                        greedy completions of two models side by side

Every command reads params.yaml and the artifacts of the project it runs in (`-C DIR` to point at
another one), prints rich tables, or JSON with `--json`, and exits with status 2 and a one-line
message plus a hint on a problem the user can fix.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import polars as pl
import torch
from rich.console import Console
from rich.table import Table

from ece.artifacts import ATTRIBUTION, COVARIANCE, EDITED, PREPARED
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
from ece.config import Params, load_params
from ece.data.facts import Fact
from ece.edit.attribution import batch_selection, neuron_scores
from ece.edit.covariance import load_covariance
from ece.edit.editor import Editor
from ece.edit.keys import keys_and_hidden
from ece.edit.zvec import compute_z
from ece.errors import EceError
from ece.methods import method_of
from ece.model.adapter import ModelAdapter
from ece.model.loading import load_model, model_fingerprint, save_model
from ece.model.prompts import context_templates, document_start

EDITED_MODEL = EDITED / "model"
ROLLBACK_MODEL = Path("artifacts/rollback/model")
PARAPHRASE_CONTEXT = "Here is a well-known fact. "  # default paraphrase: the prompt after an unseen context


# --- helpers ------------------------------------------------------------------------------------


def _params() -> Params:
    return load_params("params.yaml")


def greedy(model: torch.nn.Module, tok: Any, texts: list[str], max_new_tokens: int) -> list[str]:
    """Greedy continuation (new text only) of each text, after the tokenizer's document start."""
    out = []
    for text in texts:
        ids = torch.tensor([document_start(tok) + list(tok(text).input_ids)])
        with torch.no_grad():
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=tok.pad_token_id)
        out.append(tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True))
    return out


def _fill(prompt: str, subject: str) -> str:
    return prompt.replace("{}", subject) if "{}" in prompt else prompt


def _fact_table() -> pl.DataFrame | None:
    return pl.read_parquet(PREPARED) if PREPARED.exists() else None


def _fact_selections() -> pl.DataFrame | None:
    path = ATTRIBUTION / "facts.parquet"
    return pl.read_parquet(path) if path.exists() else None


def _env_threads() -> int:
    value = os.environ.get("ECE_THREADS", "1")
    return int(value) if value.isdigit() and int(value) > 0 else 1


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


# --- audit --------------------------------------------------------------------------------------


def audit_fact(fact_id: str, top: int = 5) -> dict[str, Any]:
    ledger = read_ledger()
    rows = ledger.filter(pl.col("fact_ids").list.contains(fact_id)).sort("layer")
    if rows.is_empty():
        examples = ", ".join(ledger["fact_ids"][0][:3]) if ledger.height else ""
        raise EceError(f"fact '{fact_id}' is not in the ledger {LEDGER}", f"use an id of the prepared dataset, e.g. {examples}")
    first = rows.row(0, named=True)
    i = first["fact_ids"].index(fact_id)
    cluster = first["clusters"][i]
    members = [fid for fid, c in zip(first["fact_ids"], first["clusters"]) if c == cluster]
    result: dict[str, Any] = {
        "fact": fact_id, "batch": first["batch"], "n_facts_in_batch": first["n_facts"], "cluster": cluster,
        "anchor": first["anchor_ids"][i], "is_anchor": first["anchor_ids"][i] == fact_id, "cluster_members": members,
        "content_hash": first["content_hashes"][i], "z_loss": first["z_loss"][i] if first["z_loss"] else None, "z_nll": first["z_nll"][i] if first["z_nll"] else None,
        "z_steps": first["z_steps"][i] if first["z_steps"] else None, "z_start": first["z_start"][i] if first["z_start"] else None,
        "dataset_hash": first["dataset_hash"], "params_hash": first["params_hash"],
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
    for r in rows.iter_rows(named=True):
        norms = dict(zip(r["neurons"], r["col_norms"]))
        own = None
        if selections is not None:
            sel = selections.filter((pl.col("id") == fact_id) & (pl.col("layer") == r["layer"]))
            own = sel["selected"][0].to_list() if sel.height else None
        pool = [n for n in (own if own is not None else r["neurons"]) if n in norms]
        ranked = sorted(pool, key=lambda n: -norms[n])[:top]
        layers.append({
            "layer": r["layer"], "batch_neurons": r["n_neurons"], "delta_norm": r["delta_norm"],
            "max_col_norm": max(r["col_norms"]) if r["col_norms"] else 0.0, "cond": _finite(r["cond"]),
            "fact_neurons": len(own) if own is not None else None,
            "fact_neurons_changed": len([n for n in own if n in norms]) if own is not None else None,
            "top_neurons": [{"neuron": n, "col_norm": norms[n]} for n in ranked],
        })
    result["layers"] = layers
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
            sel = selections.filter(pl.col("id").is_in(r["fact_ids"]) & (pl.col("layer") == layer)
                                    & pl.col("selected").list.contains(neuron))
            selecting = sel["id"].to_list()
        batches.append({"batch": r["batch"], "col_norm": norm, "n_facts": r["n_facts"], "fact_ids": r["fact_ids"],
                        "facts_selecting_it": selecting})
    result: dict[str, Any] = {"layer": layer, "neuron": neuron, "n_batches": len(batches), "batches": batches,
                              "net_change_norm": 0.0}
    if batches:
        first, last = read_delta(delta_files()[batches[0]["batch"]])[layer], read_delta(delta_files()[batches[-1]["batch"]])[layer]
        old = first.old[:, first.cols.tolist().index(neuron)].double()
        new = last.new[:, last.cols.tolist().index(neuron)].double()
        result["net_change_norm"] = float((new - old).norm())
        result["original_col_norm"] = float(old.norm())
    return result


def audit_diff(p: Params) -> dict[str, Any]:
    if not EDITED_MODEL.exists():
        raise EceError(f"{EDITED_MODEL} not found", "run the apply_edits stage first")
    original, _ = load_model(p.model.name, p.model.seed)
    edited, _ = load_model(str(EDITED_MODEL))
    prov = read_provenance(EDITED_MODEL)
    if prov and prov.get("base_fingerprint") not in (None, model_fingerprint(original)):
        raise EceError(f"{EDITED_MODEL} was not made from model.name '{p.model.name}' (it says '{prov.get('base_model')}')",
                       "set model.name in params.yaml to the model the pipeline edited")
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
                ok = torch.equal(w_e[:, col], c.new[:, c.cols.tolist().index(col)])
            if ok:
                by_batch[bs[-1]] = by_batch.get(bs[-1], 0) + 1
                mapping[col] = bs
            else:
                unattributed.append(col)
        layers.append({"layer": l, "tensor": name, "changed_columns": len(cols), "attributed": len(cols) - len(unattributed),
                       "unattributed": unattributed, "last_written_by_batch": {str(b): n for b, n in sorted(by_batch.items())},
                       "columns": {str(c): bs for c, bs in mapping.items()}})
    return {
        "original": p.model.name, "edited": str(EDITED_MODEL), "n_batches": len(deltas), "tensors_compared": len(sd_o),
        "tensors_changed": changed, "layers": sorted(layers, key=lambda x: x["layer"]), "other_changed_tensors": other,
        "all_attributed": not other and all(not x["unattributed"] for x in layers),
    }


# --- rollback -----------------------------------------------------------------------------------


def do_rollback(batches: int | None, to_batch: int | None, out: Path) -> dict[str, Any]:
    if not EDITED_MODEL.exists():
        raise EceError(f"{EDITED_MODEL} not found", "run the apply_edits stage first")
    if out.resolve() == EDITED.resolve() or EDITED.resolve() in out.resolve().parents:
        raise EceError(f"--out {out} is inside {EDITED}", f"{EDITED} is a DVC output and is never modified; write elsewhere")
    deltas = load_deltas()
    n = len(deltas)
    if batches is not None:
        if not 1 <= batches <= n:
            raise EceError(f"--batches {batches} is out of range: there are {n} batches", f"use 1..{n}")
        to_batch = n - 1 - batches
    assert to_batch is not None
    model, tok = load_model(str(EDITED_MODEL))
    undone = rollback(ModelAdapter(model), deltas, to_batch)
    save_model(model, tok, out)
    prov = read_provenance(EDITED_MODEL) or {}
    write_provenance(out, {**prov, "batches": to_batch + 1, "rolled_back_from": str(EDITED_MODEL), "undone_batches": undone})
    restored: dict[int, set[int]] = {}
    for b in undone:
        for l, c in deltas[b].items():
            restored.setdefault(l, set()).update(c.cols.tolist())
    return {"from": str(EDITED_MODEL), "out": str(out), "n_batches": n, "to_batch": to_batch, "undone_batches": undone,
            "restored_columns": {str(l): len(s) for l, s in sorted(restored.items())}}


# --- edit ---------------------------------------------------------------------------------------


def do_edit(p: Params, subject: str, prompt: str, new: str, model_name: str | None, paraphrase: str | None,
            out: Path | None, max_new_tokens: int) -> dict[str, Any]:
    if prompt.count("{}") != 1:
        raise EceError(f"--prompt must contain exactly one '{{}}' for the subject, got {prompt!r}",
                       'write e.g. --prompt "{} is located in the city of"')
    if not subject.strip() or not new.strip():
        raise EceError("--subject and --new must not be empty", 'e.g. --subject "Eiffel Tower" --new Rome')
    name = model_name or (str(EDITED_MODEL) if EDITED_MODEL.exists() else p.model.name)
    model, tok = load_model(name, p.model.seed)
    adapter = ModelAdapter(model)
    method = replace(method_of(p), use_cache=False)  # one fact, no later batch to protect it from
    layers = list(method.layers)
    adapter.check_layers(layers)
    prov = read_provenance(name) if Path(name).is_dir() else None
    fingerprint = prov["base_fingerprint"] if prov and prov.get("base_fingerprint") else model_fingerprint(model)
    if not COVARIANCE.exists():
        raise EceError(f"covariance file not found: {COVARIANCE}", "run the covariance stage first: dvc repro covariance")
    c0 = load_covariance(COVARIANCE, fingerprint, layers)
    templates = context_templates(model, tok, p.z.n_context, p.z.context_length)
    fact = Fact("cli:edit", subject, prompt, new)
    para = _fill(paraphrase, subject) if paraphrase else PARAPHRASE_CONTEXT + _fill(prompt, subject)
    texts = [_fill(prompt, subject), para]
    before = greedy(model, tok, texts, max_new_tokens)
    start = time.perf_counter()
    top = layers[-1]
    res = None
    if method.needs_z:
        res = compute_z(adapter, tok, [fact], top, templates, torch.tensor([0]), torch.tensor([0]), p.z)
    cols = None
    if method.selects_columns:
        assert res is not None
        keys, _ = keys_and_hidden(adapter, tok, [fact], templates, layers)
        residual = res.z - res.h if p.ece.scorer == "rs" else None
        cols = {l: batch_selection(neuron_scores(keys[l], adapter.w_out_weight(l), p.ece.scorer, residual),
                                   p.ece.neuron_threshold, p.ece.aggregation) for l in layers}
    editor = Editor(adapter, tok, method, templates, c0, max_update_norm=p.update.max_update_norm)
    changes = editor.apply_batch([fact], res.z if res is not None else None, cols)
    seconds = time.perf_counter() - start
    after = greedy(model, tok, texts, max_new_tokens)
    if out is not None:
        save_model(model, tok, out)
        write_provenance(out, {"base_model": (prov or {}).get("base_model", p.model.name), "base_fingerprint": fingerprint,
                               "edited_from": name, "cli_edit": {"subject": subject, "prompt": prompt, "target_new": new}})
    return {
        "model": name, "method": p.method, "fact": {"subject": subject, "prompt": prompt, "target_new": new},
        "texts": texts, "before": before, "after": after, "z_nll": float(res.losses.nll[0]) if res is not None else None, "seconds": round(seconds, 2),
        "layers": [{"layer": l, "n_neurons": len(c.cols), "delta_norm": float((c.new.double() - c.old.double()).norm())}
                   for l, c in changes.items()],
        "changed": any(not torch.equal(c.old, c.new) for c in changes.values()),
        "saved_to": str(out) if out is not None else None,
    }


# --- generate -----------------------------------------------------------------------------------


def do_generate(p: Params, prompts: list[str], model_a: str | None, model_b: str | None, max_new_tokens: int) -> dict[str, Any]:
    a = model_a or p.model.name
    b = model_b if model_b is not None else (str(EDITED_MODEL) if EDITED_MODEL.exists() else None)
    names = [a] + ([b] if b and b.lower() != "none" else [])
    columns = {}
    for name in names:
        model, tok = load_model(name, p.model.seed)
        columns[name] = greedy(model, tok, prompts, max_new_tokens)
        del model
    return {"models": names, "completions": [{"prompt": pr, **{n: columns[n][i] for n in names}} for i, pr in enumerate(prompts)]}


# --- rendering ----------------------------------------------------------------------------------


def _kv(title: str, pairs: list[tuple[str, Any]]) -> Table:
    t = Table(title=title, show_header=False)
    t.add_column(style="bold")
    t.add_column()
    for k, v in pairs:
        t.add_row(k, str(v))
    return t


def _fmt(x: Any, spec: str = ".4g") -> str:
    return "n/a" if x is None else format(x, spec)


def _z_steps(r: dict[str, Any]) -> str:
    if r["z_steps"] is None:
        return "–"
    start = "zero" if r["z_start"] == r["fact"] else f"{r['z_start']}'s shared δ"
    return f"{r['z_steps']} (started from {start})"


def render_fact(r: dict[str, Any], con: Console) -> None:
    pairs = [("fact", r["fact"])]
    if "request" in r:
        q = r["request"]
        pairs.append(("request", f"{q['prompt'].replace('{}', q['subject'])} → {q['target_new']} (was {q['target_true']})"))
    pairs += [("batch", f"{r['batch']} ({r['n_facts_in_batch']} facts)"),
              ("cluster", f"{r['cluster']} ({len(r['cluster_members'])} members)"),
              ("anchor", f"{r['anchor']}" + (" (this fact)" if r["is_anchor"] else "")),
              ("z loss / NLL", f"{r['z_loss']:.4f} / {r['z_nll']:.4f}" if r["z_loss"] is not None else "no z (fine-tuning)"),
              ("z steps", _z_steps(r)),
              ("‖ΔW‖ of its batch", f"{r['batch_delta_norm']:.4g} (all layers)"),
              ("content hash", r["content_hash"][:16]), ("dataset hash", r["dataset_hash"][:16]),
              ("git revision", (r["git_revision"] or "unknown")[:12]), ("params hash", r["params_hash"][:16])]
    con.print(_kv(f"ece audit --fact {r['fact']}", pairs))
    t = Table(title="layers (the batch's change; the fact's own attributed neurons)")
    for c in ("layer", "batch neurons", "‖ΔW‖_F", "max col ‖Δ‖", "cond", "fact neurons (changed)", "top changed neurons of the fact"):
        t.add_column(c, justify="right" if c != "top changed neurons of the fact" else "left")
    for l in r["layers"]:
        own = "n/a" if l["fact_neurons"] is None else f"{l['fact_neurons']} ({l['fact_neurons_changed']})"
        tops = ", ".join(f"{x['neuron']}:{x['col_norm']:.3g}" for x in l["top_neurons"])
        t.add_row(str(l["layer"]), str(l["batch_neurons"]), _fmt(l["delta_norm"]), _fmt(l["max_col_norm"]), _fmt(l["cond"], ".3g"), own, tops)
    con.print(t)


def render_neuron(r: dict[str, Any], con: Console) -> None:
    if not r["batches"]:
        con.print(f"no batch changed column {r['neuron']} of W_out at layer {r['layer']}")
        return
    t = Table(title=f"ece audit --layer {r['layer']} --neuron {r['neuron']}: {r['n_batches']} batch(es) changed this column")
    for c in ("batch", "‖Δ column‖", "facts", "facts whose own attribution selected it"):
        t.add_column(c, justify="right" if c != "facts whose own attribution selected it" else "left")
    for b in r["batches"]:
        sel = "n/a" if b["facts_selecting_it"] is None else (", ".join(b["facts_selecting_it"]) or "none")
        t.add_row(str(b["batch"]), f"{b['col_norm']:.4g}", str(b["n_facts"]), sel)
    con.print(t)
    con.print(f"net change original → edited: ‖Δ‖ = {r['net_change_norm']:.4g} (column norm before: {r['original_col_norm']:.4g})")


def render_diff(r: dict[str, Any], con: Console) -> None:
    con.print(f"ece audit --diff: {r['original']} vs {r['edited']}: {len(r['tensors_changed'])} of "
              f"{r['tensors_compared']} tensors differ, {r['n_batches']} batches in the deltas")
    t = Table(title="changed columns of W_out, by the batch that wrote their final value")
    for c in ("layer", "tensor", "changed columns", "attributed", "unattributed", "last written by batch (columns)"):
        t.add_column(c, justify="left" if c in ("tensor", "last written by batch (columns)") else "right")
    for l in r["layers"]:
        t.add_row(str(l["layer"]), l["tensor"], str(l["changed_columns"]), str(l["attributed"]), str(len(l["unattributed"])),
                  ", ".join(f"{b}: {n}" for b, n in l["last_written_by_batch"].items()))
    con.print(t)
    if r["other_changed_tensors"]:
        con.print(f"[red]tensors changed outside W_out (unattributed): {', '.join(r['other_changed_tensors'])}[/red]")
    con.print("every changed column is attributed to a batch" if r["all_attributed"] else "[red]some changes are not attributed[/red]")


def render_rollback(r: dict[str, Any], con: Console) -> None:
    state = "the original model" if r["to_batch"] == -1 else f"the state right after batch {r['to_batch']}"
    con.print(_kv("ece rollback", [
        ("from", r["from"]), ("undone batches", ", ".join(map(str, r["undone_batches"])) or "none"),
        ("result", state), ("restored columns", ", ".join(f"layer {l}: {n}" for l, n in r["restored_columns"].items())),
        ("written to", r["out"]),
    ]))


def render_edit(r: dict[str, Any], con: Console) -> None:
    f = r["fact"]
    con.print(f"ece edit: {f['prompt'].replace('{}', f['subject'])} → {f['target_new']}  on {r['model']} "
              f"({r['method']}, {r['seconds']} s" + (f", z NLL {r['z_nll']:.3f})" if r["z_nll"] is not None else ")"))
    t = Table(title="greedy completions")
    for c in ("text", "before", "after"):
        t.add_column(c)
    for text, b, a in zip(r["texts"], r["before"], r["after"]):
        t.add_row(text, b, a)
    con.print(t)
    con.print("layers: " + ", ".join(f"{l['layer']} ({l['n_neurons']} columns, ‖ΔW‖ {l['delta_norm']:.3g})" for l in r["layers"]))
    con.print(f"saved to {r['saved_to']}" if r["saved_to"] else "not saved (pass --out DIR to save the edited model)")


def render_generate(r: dict[str, Any], con: Console) -> None:
    t = Table(title="greedy completions")
    t.add_column("prompt")
    for name in r["models"]:
        t.add_column(name)
    for row in r["completions"]:
        t.add_row(row["prompt"], *[row[n] for n in r["models"]])
    con.print(t)


# --- argument parsing ---------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ece", description="Audit, roll back, edit and compare models of an ECE project.")
    parser.add_argument("-C", "--root", default=".", help="project root (where params.yaml and artifacts/ are); default: .")
    parser.add_argument("--threads", type=int, default=_env_threads(),
                        help="CPU threads for torch (default: $ECE_THREADS or 1; one-fact work gains little from more, "
                             "and several threads on a busy machine can be 10x slower)")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print JSON instead of tables")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{audit,rollback,edit,generate}")

    audit = sub.add_parser("audit", parents=[common], help="query the edit ledger",
                           description="Query the ledger written by apply_edits (artifacts/edited/ledger.parquet).")
    what = audit.add_mutually_exclusive_group(required=True)
    what.add_argument("--fact", metavar="ID", help="a fact id: its batch, cluster, anchor, layers, neurons, change size")
    what.add_argument("--layer", type=int, metavar="L", help="an edited layer (with --neuron)")
    what.add_argument("--diff", action="store_true", help="weights that differ between model.name and artifacts/edited/model")
    audit.add_argument("--neuron", type=int, metavar="N", help="a column of W_out at --layer: which batches changed it")
    audit.add_argument("--top", type=int, default=5, help="neurons listed per layer with --fact (default 5)")

    rb = sub.add_parser("rollback", parents=[common], help="undo batches, bit for bit, into a new model folder",
                        description="Undo the last batches of artifacts/edited/model from the stored old columns "
                                    "(bit-exact) and write a new HF folder; artifacts/edited is never modified.")
    how = rb.add_mutually_exclusive_group(required=True)
    how.add_argument("--batches", type=int, metavar="N", help="undo the last N batches")
    how.add_argument("--to-batch", type=int, metavar="B", help="the state right after batch B (-1: the original model)")
    rb.add_argument("--out", type=Path, help=f"output folder (default {ROLLBACK_MODEL} under the project root)")

    ed = sub.add_parser("edit", parents=[common], help="edit one fact into a model in seconds",
                        description="Edit one fact (MEMIT-style z with the params' z settings, a one-fact batch, "
                                    "C0 from artifacts/covariance/c0.safetensors, no cache P) and print greedy "
                                    "completions before and after.")
    ed.add_argument("--subject", required=True, help='e.g. "Eiffel Tower"')
    ed.add_argument("--prompt", required=True, help='with one {} for the subject, e.g. "{} is located in the city of"')
    ed.add_argument("--new", required=True, help="the new object, e.g. Rome")
    ed.add_argument("--model", help=f"model name or folder (default {EDITED_MODEL} if it exists, else params model.name)")
    ed.add_argument("--paraphrase", help=f'a second prompt to check ({{}} = subject; default: "{PARAPHRASE_CONTEXT}" + the prompt)')
    ed.add_argument("--out", type=Path, help="save the edited model to this folder (default: not saved)")
    ed.add_argument("--max-new-tokens", type=int, default=12, help="greedy tokens per completion (default 12)")

    gen = sub.add_parser("generate", parents=[common], help="greedy completions of two models side by side",
                         description="Greedy completions of --model (default params model.name) and --compare "
                                     f"(default {EDITED_MODEL} if it exists; 'none' for no comparison).")
    gen.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for several)")
    gen.add_argument("--model", help="model name or folder (default: params model.name)")
    gen.add_argument("--compare", help=f"second model name or folder (default {EDITED_MODEL})")
    gen.add_argument("--max-new-tokens", type=int, default=20, help="greedy tokens per completion (default 20)")
    return parser


def run_command(args: argparse.Namespace) -> tuple[dict[str, Any], Callable[[dict[str, Any], Console], None]]:
    if args.command == "audit":
        if args.fact is not None:
            return audit_fact(args.fact, args.top), render_fact
        if args.layer is not None:
            if args.neuron is None:
                raise EceError("--layer needs --neuron", "e.g. ece audit --layer 5 --neuron 123")
            return audit_neuron(args.layer, args.neuron), render_neuron
        return audit_diff(_params()), render_diff
    if args.command == "rollback":
        return do_rollback(args.batches, args.to_batch, args.out), render_rollback
    if args.command == "edit":
        return do_edit(_params(), args.subject, args.prompt, args.new, args.model, args.paraphrase, args.out,
                       args.max_new_tokens), render_edit
    return do_generate(_params(), args.prompt, args.model, args.compare, args.max_new_tokens), render_generate


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights" bars: the models load in about a second
    torch.set_num_threads(max(1, args.threads))
    if args.command == "audit" and args.neuron is not None and args.layer is None:
        print("error: --neuron needs --layer\n  hint: e.g. ece audit --layer 5 --neuron 123", file=sys.stderr)
        return 2
    cwd = Path.cwd()
    for name in ("out", "model", "compare"):  # paths the user typed are relative to where they typed them
        value = getattr(args, name, None)
        if value is not None and (name == "out" or (cwd / str(value)).exists()):
            setattr(args, name, type(value)(os.path.abspath(cwd / str(value))))
    if args.command == "rollback" and args.out is None:
        args.out = ROLLBACK_MODEL
    try:
        os.chdir(args.root)
    except OSError as exc:
        print(f"error: cannot enter the project root {args.root}: {exc.strerror}", file=sys.stderr)
        return 2
    try:
        result, render = run_command(args)
    except EceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        os.chdir(cwd)
    if args.json:
        print(json.dumps(result, indent=2, ensure_ascii=False))
    else:
        render(result, Console(width=max(Console().width, 140)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
