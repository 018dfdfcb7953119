"""UltraEdit on SmolLM2: does it edit, at the reference's step size and at others? -> reports/ultraedit_check.md

Every configuration edits the first N facts of params.yaml's dataset (or --dataset) into a freshly loaded
model through `ece.edit` (method ultraedit, batches of `edit.batch_size`) and scores it with
`ece.evaluate` (rewrite metrics and perplexity; general tasks and sampled generations off). The scale
columns say why the reference's lr does little on a model this small: its pseudo value is
v = −lr·‖k̂‖²·ĝ with ‖k̂‖² ≈ f and ‖ĝ‖ ≈ √d (standardised features), so ‖v‖ grows with the width as f·√d
(Mistral-7B's down_proj: 14336·√4096 ≈ 9.2e5; SmolLM2's: 1536·√576 ≈ 3.7e4), while the residual
stream it moves is ~100-550 here. Example (the report's numbers):

    OMP_NUM_THREADS=1 python bench/ultraedit_check.py --n-facts 50 \
        --config "3-7 lr=1e-6" --config "3-7 lr=2.5e-5" --config "3-7 lr=1e-4" \
        --config "20-26 lr=1e-6" --config "20-26 lr=1e-4"

A config is "FIRST-LAST lr=VALUE" (edit.layers = FIRST..LAST). Rows accumulate in
reports/ultraedit_check.json (a rerun of a config replaces its row); the .md is redrawn from all rows.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ece import edit, evaluate
from ece.config import load_params
from ece.data.loaders import load_edits
from ece.model.loading import load_model

ROOT = Path(__file__).resolve().parents[1]
OUT_JSON = ROOT / "reports" / "ultraedit_check.json"
OUT_MD = ROOT / "reports" / "ultraedit_check.md"
METRICS = ("efficacy", "generalization", "specificity", "perplexity")
EVAL = ["evaluate.general_tasks=[]", "evaluate.gen_per_fact=0"]


def parse(config: str) -> tuple[list[int], float]:
    window, lr = config.split()
    first, last = (int(x) for x in window.split("-"))
    return list(range(first, last + 1)), float(lr.removeprefix("lr="))


def measure(config: str | None, n_facts: int, dataset: str | None) -> dict[str, Any]:
    """Metrics of the unedited model (config None) or of one UltraEdit run, on the first n_facts facts
    of `dataset` (None: params.yaml's)."""
    overrides = [f"data.n_facts={n_facts}", *EVAL, *([f"data.edit_dataset={dataset}"] if dataset else [])]
    if config is not None:
        layers, lr = parse(config)
        overrides += ["method=ultraedit", f"edit.layers={layers}".replace(" ", ""), f"ultraedit.lr={lr}"]
    p = load_params(ROOT / "params.yaml", overrides)
    p.data.edit_dataset = str(ROOT / p.data.edit_dataset)
    p.evaluate.ppl_corpus = str(ROOT / p.evaluate.ppl_corpus)
    facts = load_edits(p.data)
    model, tok = load_model(p.model.name)
    row: dict[str, Any] = {"dataset": Path(p.data.edit_dataset).name, "config": config or "unedited"}
    row["n_facts"] = facts.height
    if config is not None:
        result = edit(model, tok, facts, params=p, log=lambda _m: None)
        row["batch_size"] = p.edit.batch_size
        row["s_per_batch"] = sum(r["update"] for r in result.runs) / len(result.runs)
        norms = [r["delta_norm"] for r in result.layers]
        row["delta_norm_mean"] = sum(norms) / len(norms)
    summary = evaluate(model, tok, facts, params=p)["summary"]
    row.update({m: summary[m] for m in METRICS})
    return row


def table(rows: list[dict[str, Any]]) -> str:
    def cell(v: Any) -> str:
        return "–" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)

    cols = ("dataset", "config", "n_facts", *METRICS, "delta_norm_mean", "s_per_batch")
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-facts", type=int, default=50)
    ap.add_argument("--config", action="append", default=[], help='"FIRST-LAST lr=VALUE"')
    ap.add_argument("--dataset", help="edit dataset (default: params.yaml's data.edit_dataset)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = {
        (r["dataset"], r["n_facts"], r["config"]): r
        for r in (json.loads(OUT_JSON.read_text()) if OUT_JSON.exists() else [])
    }
    for config in [None, *args.config]:
        start = time.perf_counter()
        row = measure(config, args.n_facts, args.dataset)
        print(f"{row['config']}: {row} ({time.perf_counter() - start:.0f} s)", file=sys.stderr)
        row["command"] = "OMP_NUM_THREADS=1 python bench/ultraedit_check.py " + shlex.join(sys.argv[1:])
        rows[row["dataset"], row["n_facts"], row["config"]] = row
        OUT_JSON.write_text(json.dumps(list(rows.values()), indent=1) + "\n")
    commands = dict.fromkeys(r["command"] for r in rows.values())
    OUT_MD.write_text(
        "# UltraEdit on SmolLM2-135M (bench/ultraedit_check.py)\n\n"
        "The first n_facts facts of a dataset, edited in sequential batches by `ece.edit` (method ultraedit; "
        "config = edited layers and `ultraedit.lr`), scored by `ece.evaluate` after the last batch (general "
        "tasks and generations off). delta_norm_mean: mean ‖ΔW‖_F per (batch, layer); s_per_batch: seconds "
        "of the update per batch on the shared 2-core CPU. Commands:\n\n"
        + "".join(f"    {c}\n" for c in commands)
        + "\n"
        + table(list(rows.values()))
        + "\n"
    )


if __name__ == "__main__":
    main()
