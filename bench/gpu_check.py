"""The GPU check: one command on a machine with CUDA (target: under 8 minutes on one recent GPU).

    python bench/gpu_check.py                 # all three parts
    python bench/gpu_check.py --scale 0       # skip the 2000-edit timings

1. The default pipeline (params.yaml, prepare → evaluate) with runtime.device=cuda in a scratch folder:
   its metrics and seconds per stage.
2. CPU against GPU: the first 25 CounterFact facts edited on each (same C0, that of part 1), compared
   per edited layer by the cosine of the two weight changes and their largest difference relative to
   the CPU change's largest entry. Tolerance: cosine >= 0.99 — z's early stop may end one step apart
   when a fact's NLL sits at the threshold, so bit-equality is not expected.
3. 2000 sequential CounterFact edits in batches of 100 on the GPU, ECE and MEMIT (edits only, no
   evaluation): seconds per batch by phase, from the pipeline's own reports/ledger_runs.json.

Writes reports/gpu_check.md and .json. Without CUDA it says so and exits with status 2: nothing here
is an estimate. Each run has its own scratch folder (.cache/gpu_check/<run>, its own z store), so no
run reuses another's z.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from scratch import ROOT, inside, run_stages

from ece.audit.ledger import LEDGER_RUNS
from ece.config import load_params
from ece.model.loading import load_model

WORK = ROOT / ".cache" / "gpu_check"
ALL = ["prepare", "covariance", "attribute", "cluster", "precompute_z", "apply_edits", "evaluate"]
EDIT = ["prepare", "attribute", "cluster", "precompute_z", "apply_edits"]
W_OUT = "model.layers.{}.mlp.down_proj.weight"
TOLERANCE = 0.99  # cosine of the CPU and GPU weight changes, per edited layer


def fresh(name: str, covariance_from: Path | None = None) -> Path:
    work = WORK / name
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    if covariance_from is not None:
        shutil.copytree(covariance_from / "artifacts" / "covariance", work / "artifacts" / "covariance")
    return work


def weight_changes(work: Path, base: dict[str, torch.Tensor], layers: list[int]) -> dict[int, torch.Tensor]:
    edited = load_file(work / "artifacts" / "edited" / "model" / "model.safetensors")
    return {l: edited[W_OUT.format(l)].double() - base[W_OUT.format(l)].double() for l in layers}


def default_run() -> dict[str, Any]:
    work = fresh("default")
    start = time.perf_counter()
    _, seconds = run_stages(["runtime.device=cuda"], work, ALL)
    metrics = json.loads((work / "reports" / "edit_metrics.json").read_text())
    return {"seconds": seconds, "total_s": round(time.perf_counter() - start, 1), "metrics": metrics}


def cpu_vs_gpu(n_facts: int) -> dict[str, Any]:
    source = WORK / "default"
    runs = {d: fresh(f"{d}-{n_facts}", source) for d in ("cpu", "cuda")}
    for device, work in runs.items():
        run_stages([f"runtime.device={device}", f"data.n_facts={n_facts}"], work, EDIT)
    p = load_params(ROOT / "params.yaml")
    base = {k: v.cpu() for k, v in load_model(p.model.name, p.model.seed, p.model.dtype, "cpu")[0].state_dict().items()}
    changes = {d: weight_changes(w, base, list(p.edit.layers)) for d, w in runs.items()}
    layers = {}
    for l in p.edit.layers:
        c, g = changes["cpu"][l], changes["cuda"][l]
        cos = float((c.flatten() @ g.flatten()) / (c.norm() * g.norm()))
        layers[l] = {"cosine": round(cos, 5), "max_rel_diff": float((c - g).abs().max() / c.abs().max())}
    ok = all(v["cosine"] >= TOLERANCE for v in layers.values())
    return {"n_facts": n_facts, "layers": layers, "within_tolerance": ok}


def scale_timing(n_facts: int) -> dict[str, Any]:
    out = {}
    for method in ("ece", "memit"):
        work = fresh(f"scale-{method}", WORK / "default")
        overrides = ["runtime.device=cuda", f"method={method}", f"data.n_facts={n_facts}", "edit.batch_size=100"]
        overrides += ["data.edit_dataset=data/counterfact/counterfact_compact_0-19999.json"]
        start = time.perf_counter()
        run_stages(overrides, work, EDIT)
        with inside(work):
            runs = json.loads(Path(LEDGER_RUNS).read_text())
        out[method] = {"total_s": round(time.perf_counter() - start, 1), "batches": runs}
    return out


def markdown(r: dict[str, Any]) -> str:
    lines = [
        "# GPU check",
        "",
        f"`python bench/gpu_check.py` on {r['device']} ({time.strftime('%Y-%m-%d')}), torch {torch.__version__}.",
        "",
        "## Default pipeline on the GPU",
        "",
        f"Total {r['default']['total_s']} s; per stage: "
        + ", ".join(f"{k} {v} s" for k, v in r["default"]["seconds"].items()),
        "",
        "Metrics: " + ", ".join(f"{k} {v:.3f}" for k, v in r["default"]["metrics"].items() if isinstance(v, float)),
        "",
        f"## CPU vs GPU weights ({r['compare']['n_facts']} facts; tolerance: cosine >= {TOLERANCE})",
        "",
        "| layer | cosine | max relative difference |",
        "|---|---|---|",
        *[f"| {l} | {v['cosine']:.5f} | {v['max_rel_diff']:.2e} |" for l, v in r["compare"]["layers"].items()],
        "",
        f"Within tolerance: {r['compare']['within_tolerance']}",
        "",
    ]
    if r.get("scale"):
        lines += ["## 2000 sequential edits on the GPU (batches of 100, edits only)", ""]
        for method, s in r["scale"].items():
            lines.append(f"- {method}: {s['total_s']} s in all, {len(s['batches'])} batches")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--facts", type=int, default=25, help="facts edited on both CPU and GPU for the comparison")
    ap.add_argument("--scale", type=int, default=2000, help="facts for the timing runs (0 skips them)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device on this machine: the GPU check was not run")
        sys.exit(2)
    os.environ.pop("ECE_SCRATCH", None)  # each run its own .cache inside its scratch folder
    result: dict[str, Any] = {"device": torch.cuda.get_device_name(0)}
    result["default"] = default_run()
    print("default pipeline:", result["default"]["total_s"], "s")
    result["compare"] = cpu_vs_gpu(args.facts)
    print("cpu vs gpu:", result["compare"])
    if args.scale:
        result["scale"] = scale_timing(args.scale)
    (ROOT / "reports" / "gpu_check.json").write_text(json.dumps(result, indent=2) + "\n")
    (ROOT / "reports" / "gpu_check.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
