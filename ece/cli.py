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
                                        greedy completions of two models side by side (a folder with an
                                        edit memory, SERAC's, answers through it and names the entry used)

Every command reads params.yaml and the artifacts of the project it runs in (`-C DIR` to point at
another one), prints rich tables, or JSON with `--json`, and exits with status 2 and a one-line
message plus a hint on a problem the user can fix.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from ece.api import edit
from ece.artifacts import COVARIANCE
from ece.audit.ledger import (
    read_provenance,
    write_provenance,
    z_start,
)
from ece.audit.queries import EDITED_MODEL, audit_diff, audit_fact, audit_neuron, do_rollback
from ece.config import Params, load_params
from ece.editing.covariance import load_covariance
from ece.editing.serac import MEMORY_DIR, MemoryRouter, open_router
from ece.errors import EceError
from ece.eval.scoring import routed
from ece.methods import REGISTRY, edited_layers
from ece.model.adapter import ModelAdapter
from ece.model.loading import load_for, model_fingerprint, save_model
from ece.model.prompts import greedy

ROLLBACK_MODEL = Path("artifacts/rollback/model")
PARAPHRASE_CONTEXT = "Here is a well-known fact. "  # default paraphrase: the prompt after an unseen context


# --- helpers ------------------------------------------------------------------------------------


def _params() -> Params:
    return load_params("params.yaml")


def _fill(prompt: str, subject: str) -> str:
    return prompt.replace("{}", subject) if "{}" in prompt else prompt


def _env_threads() -> int:
    value = os.environ.get("ECE_THREADS", "1")
    return int(value) if value.isdigit() and int(value) > 0 else 1


# --- edit ---------------------------------------------------------------------------------------


def do_edit(
    p: Params,
    subject: str,
    prompt: str,
    new: str,
    model_name: str | None,
    paraphrase: str | None,
    out: Path | None,
    max_new_tokens: int,
) -> dict[str, Any]:
    if prompt.count("{}") != 1:
        raise EceError(
            f"--prompt must contain exactly one '{{}}' for the subject, got {prompt!r}",
            'write e.g. --prompt "{} is located in the city of"',
        )
    if not subject.strip() or not new.strip():
        raise EceError("--subject and --new must not be empty", 'e.g. --subject "Eiffel Tower" --new Rome')
    name = model_name or (str(EDITED_MODEL) if EDITED_MODEL.exists() else p.model.name)
    model, tok = load_for(p, name)
    prov = read_provenance(name) if Path(name).is_dir() else None
    # C0 belongs to the original model: an edited folder names the fingerprint it was computed for
    fingerprint = prov["base_fingerprint"] if prov and prov.get("base_fingerprint") else model_fingerprint(model)
    needs_c0 = REGISTRY[p.method].needs_covariance  # fine-tuning and UltraEdit edit without C0
    if needs_c0 and not COVARIANCE.exists():
        raise EceError(
            f"covariance file not found: {COVARIANCE}", "run the covariance stage first: dvc repro covariance"
        )
    c0 = load_covariance(COVARIANCE, fingerprint, edited_layers(p)) if needs_c0 else None
    para = _fill(paraphrase, subject) if paraphrase else PARAPHRASE_CONTEXT + _fill(prompt, subject)
    texts = [_fill(prompt, subject), para]
    before = greedy(model, tok, texts, max_new_tokens)
    start = time.perf_counter()
    result = edit(
        model,
        tok,
        [{"id": "cli:edit", "subject": subject, "prompt": prompt, "target_new": new}],
        params=p,
        covariance=c0,
        log=lambda _: None,
    )
    seconds = time.perf_counter() - start
    router = MemoryRouter(result.memory, ModelAdapter(model), tok) if result.memory is not None else None
    after = greedy(model, tok, routed(texts, router), max_new_tokens)
    if out is not None:
        save_model(model, tok, out)
        if result.memory is not None:
            result.memory.save(out / MEMORY_DIR)
        write_provenance(
            out,
            {
                "base_model": (prov or {}).get("base_model", p.model.name),
                "base_fingerprint": fingerprint,
                "edited_from": name,
                "cli_edit": {"subject": subject, "prompt": prompt, "target_new": new},
            },
        )
    z_rows, changes = result.plans[0].z_rows, result.changes[0]
    return {
        "model": name,
        "method": p.method,
        "fact": {"subject": subject, "prompt": prompt, "target_new": new},
        "texts": texts,
        "before": before,
        "after": after,
        "z_nll": z_rows[0]["nll"] if z_rows else None,
        "seconds": round(seconds, 2),
        "layers": [
            {"layer": l, "n_neurons": len(c.cols), "delta_norm": float((c.new.double() - c.old.double()).norm())}
            for l, c in changes.items()
        ],
        "changed": any(not torch.equal(c.old, c.new) for c in changes.values()),
        "saved_to": str(out) if out is not None else None,
    }


# --- generate -----------------------------------------------------------------------------------


def do_generate(
    p: Params, prompts: list[str], model_a: str | None, model_b: str | None, max_new_tokens: int
) -> dict[str, Any]:
    a = model_a or p.model.name
    b = model_b if model_b is not None else (str(EDITED_MODEL) if EDITED_MODEL.exists() else None)
    names = [a] + ([b] if b and b.lower() != "none" else [])
    columns, memory = {}, {}
    for name in names:
        model, tok = load_for(p, name)
        # a folder with an edit memory (SERAC) answers through it: each prompt after its retrieved edit
        router = open_router(Path(name), model, tok) if (Path(name) / MEMORY_DIR).is_dir() else None
        columns[name] = greedy(model, tok, routed(prompts, router), max_new_tokens)
        if router is not None:
            memory[name] = dict(router.routing().select("text", "memory_id").iter_rows())
        del model
    return {
        "models": names,
        "completions": [
            {
                "prompt": pr,
                **{n: columns[n][i] for n in names},
                **{f"{n} memory entry": memory[n][pr] for n in memory},
            }
            for i, pr in enumerate(prompts)
        ],
    }


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
    return f"{r['z_steps']} (started from {z_start(r['fact'], r['z_start'], r['z_earlier'], r['z_predicted'])})"


def render_fact(r: dict[str, Any], con: Console, top_texts: int = 10) -> None:
    pairs = [("fact", r["fact"])]
    if "request" in r:
        q = r["request"]
        pairs.append(
            ("request", f"{q['prompt'].replace('{}', q['subject'])} → {q['target_new']} (was {q['target_true']})")
        )
    pairs += [
        ("batch", f"{r['batch']} ({r['n_facts_in_batch']} facts)"),
        ("cluster", f"{r['cluster']} ({len(r['cluster_members'])} members)"),
        ("anchor", f"{r['anchor']}" + (" (this fact)" if r["is_anchor"] else "")),
        ("z loss / NLL", f"{r['z_loss']:.4f} / {r['z_nll']:.4f}" if r["z_loss"] is not None else "no z (fine-tuning)"),
        ("z steps", _z_steps(r)),
        ("‖ΔW‖ of its batch", f"{r['batch_delta_norm']:.4g} (all layers)"),
        ("content hash", r["content_hash"][:16]),
        ("dataset hash", r["dataset_hash"][:16]),
        ("git revision", (r["git_revision"] or "unknown")[:12]),
        ("params hash", r["params_hash"][:16]),
    ]
    if "memory" in r:
        m = r["memory"]
        answered = "not evaluated yet" if m["answered"] is None else f"answered {len(m['answered'])} evaluated texts"
        pairs.append(("edit memory", f"batch {m['batch']}: {m['statement']!r}; {answered}"))
        pairs += [("  answered", text) for text in (m["answered"] or [])[:top_texts]]
    con.print(_kv(f"ece audit --fact {r['fact']}", pairs))
    t = Table(title="layers (the batch's change; the fact's own attributed neurons)")
    for c in (
        "layer",
        "batch neurons",
        "‖ΔW‖_F",
        "max col ‖Δ‖",
        "cond",
        "fact neurons (changed)",
        "top changed neurons of the fact",
    ):
        t.add_column(c, justify="right" if c != "top changed neurons of the fact" else "left")
    for l in r["layers"]:
        own = "n/a" if l["fact_neurons"] is None else f"{l['fact_neurons']} ({l['fact_neurons_changed']})"
        tops = ", ".join(f"{x['neuron']}:{x['col_norm']:.3g}" for x in l["top_neurons"])
        t.add_row(
            str(l["layer"]),
            str(l["batch_neurons"]),
            _fmt(l["delta_norm"]),
            _fmt(l["max_col_norm"]),
            _fmt(l["cond"], ".3g"),
            own,
            tops,
        )
    if r["layers"]:  # a method that answers through its memory (SERAC) wrote no layer
        con.print(t)


def render_neuron(r: dict[str, Any], con: Console) -> None:
    if not r["batches"]:
        con.print(f"no batch changed column {r['neuron']} of W_out at layer {r['layer']}")
        return
    t = Table(
        title=f"ece audit --layer {r['layer']} --neuron {r['neuron']}: {r['n_batches']} batch(es) changed this column"
    )
    for c in ("batch", "‖Δ column‖", "facts", "facts whose own attribution selected it"):
        t.add_column(c, justify="right" if c != "facts whose own attribution selected it" else "left")
    for b in r["batches"]:
        sel = "n/a" if b["facts_selecting_it"] is None else (", ".join(b["facts_selecting_it"]) or "none")
        t.add_row(str(b["batch"]), f"{b['col_norm']:.4g}", str(b["n_facts"]), sel)
    con.print(t)
    con.print(
        f"net change original → edited: ‖Δ‖ = {r['net_change_norm']:.4g} (column norm before: {r['original_col_norm']:.4g})"
    )


def render_diff(r: dict[str, Any], con: Console) -> None:
    con.print(
        f"ece audit --diff: {r['original']} vs {r['edited']}: {len(r['tensors_changed'])} of "
        f"{r['tensors_compared']} tensors differ, {r['n_batches']} batches in the deltas"
    )
    t = Table(title="changed columns of W_out, by the batch that wrote their final value")
    for c in ("layer", "tensor", "changed columns", "attributed", "unattributed", "last written by batch (columns)"):
        t.add_column(c, justify="left" if c in ("tensor", "last written by batch (columns)") else "right")
    for l in r["layers"]:
        t.add_row(
            str(l["layer"]),
            l["tensor"],
            str(l["changed_columns"]),
            str(l["attributed"]),
            str(len(l["unattributed"])),
            ", ".join(f"{b}: {n}" for b, n in l["last_written_by_batch"].items()),
        )
    con.print(t)
    if r["other_changed_tensors"]:
        con.print(f"[red]tensors changed outside W_out (unattributed): {', '.join(r['other_changed_tensors'])}[/red]")
    con.print(
        "every changed column is attributed to a batch"
        if r["all_attributed"]
        else "[red]some changes are not attributed[/red]"
    )


def render_rollback(r: dict[str, Any], con: Console) -> None:
    state = "the original model" if r["to_batch"] == -1 else f"the state right after batch {r['to_batch']}"
    con.print(
        _kv(
            "ece rollback",
            [
                ("from", r["from"]),
                ("undone batches", ", ".join(map(str, r["undone_batches"])) or "none"),
                ("result", state),
                ("restored columns", ", ".join(f"layer {l}: {n}" for l, n in r["restored_columns"].items())),
                ("written to", r["out"]),
            ],
        )
    )


def render_edit(r: dict[str, Any], con: Console) -> None:
    f = r["fact"]
    con.print(
        f"ece edit: {f['prompt'].replace('{}', f['subject'])} → {f['target_new']}  on {r['model']} "
        f"({r['method']}, {r['seconds']} s" + (f", z NLL {r['z_nll']:.3f})" if r["z_nll"] is not None else ")")
    )
    t = Table(title="greedy completions")
    for c in ("text", "before", "after"):
        t.add_column(c)
    for text, b, a in zip(r["texts"], r["before"], r["after"]):
        t.add_row(text, b, a)
    con.print(t)
    con.print(
        "layers: "
        + ", ".join(f"{l['layer']} ({l['n_neurons']} columns, ‖ΔW‖ {l['delta_norm']:.3g})" for l in r["layers"])
    )
    con.print(f"saved to {r['saved_to']}" if r["saved_to"] else "not saved (pass --out DIR to save the edited model)")


def render_generate(r: dict[str, Any], con: Console) -> None:
    t = Table(title="greedy completions")
    t.add_column("prompt")
    for name in r["models"]:
        t.add_column(name)
    routed_by = [k for k in (r["completions"][0] if r["completions"] else {}) if k.endswith(" memory entry")]
    for name in routed_by:
        t.add_column(name)
    for row in r["completions"]:
        t.add_row(row["prompt"], *[row[n] for n in r["models"]], *[str(row[k] or "none") for k in routed_by])
    con.print(t)


# --- argument parsing ---------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ece", description="Audit, roll back, edit and compare models of an ECE project."
    )
    parser.add_argument(
        "-C", "--root", default=".", help="project root (where params.yaml and artifacts/ are); default: ."
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=_env_threads(),
        help="CPU threads for torch (default: $ECE_THREADS or 1; one-fact work gains little from more, "
        "and several threads on a busy machine can be 10x slower)",
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print JSON instead of tables")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{audit,rollback,edit,generate}")

    audit = sub.add_parser(
        "audit",
        parents=[common],
        help="query the edit ledger",
        description="Query the ledger written by apply_edits (artifacts/edited/ledger.parquet).",
    )
    what = audit.add_mutually_exclusive_group(required=True)
    what.add_argument(
        "--fact", metavar="ID", help="a fact id: its batch, cluster, anchor, layers, neurons, change size"
    )
    what.add_argument("--layer", type=int, metavar="L", help="an edited layer (with --neuron)")
    what.add_argument(
        "--diff", action="store_true", help="weights that differ between model.name and artifacts/edited/model"
    )
    audit.add_argument("--neuron", type=int, metavar="N", help="a column of W_out at --layer: which batches changed it")
    audit.add_argument("--top", type=int, default=5, help="neurons listed per layer with --fact (default 5)")

    rb = sub.add_parser(
        "rollback",
        parents=[common],
        help="undo batches, bit for bit, into a new model folder",
        description="Undo the last batches of artifacts/edited/model from the stored old columns "
        "(bit-exact) and write a new HF folder; artifacts/edited is never modified.",
    )
    how = rb.add_mutually_exclusive_group(required=True)
    how.add_argument("--batches", type=int, metavar="N", help="undo the last N batches")
    how.add_argument("--to-batch", type=int, metavar="B", help="the state right after batch B (-1: the original model)")
    rb.add_argument("--out", type=Path, help=f"output folder (default {ROLLBACK_MODEL} under the project root)")

    ed = sub.add_parser(
        "edit",
        parents=[common],
        help="edit one fact into a model in seconds",
        description="Edit one fact with the params' method (MEMIT-style z with the params' z settings, a "
        "one-fact batch, C0 from artifacts/covariance/c0.safetensors for the methods that use it, no cache P) "
        "and print greedy completions before and after.",
    )
    ed.add_argument("--subject", required=True, help='e.g. "Eiffel Tower"')
    ed.add_argument("--prompt", required=True, help='with one {} for the subject, e.g. "{} is located in the city of"')
    ed.add_argument("--new", required=True, help="the new object, e.g. Rome")
    ed.add_argument(
        "--model", help=f"model name or folder (default {EDITED_MODEL} if it exists, else params model.name)"
    )
    ed.add_argument(
        "--paraphrase", help=f'a second prompt to check ({{}} = subject; default: "{PARAPHRASE_CONTEXT}" + the prompt)'
    )
    ed.add_argument("--out", type=Path, help="save the edited model to this folder (default: not saved)")
    ed.add_argument("--max-new-tokens", type=int, default=12, help="greedy tokens per completion (default 12)")

    gen = sub.add_parser(
        "generate",
        parents=[common],
        help="greedy completions of two models side by side",
        description="Greedy completions of --model (default params model.name) and --compare "
        f"(default {EDITED_MODEL} if it exists; 'none' for no comparison).",
    )
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
        return do_edit(
            _params(), args.subject, args.prompt, args.new, args.model, args.paraphrase, args.out, args.max_new_tokens
        ), render_edit
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
