"""Is z bit-reproducible run to run? The first batch's z of the default run, computed in fresh processes.

    python bench/determinism.py                 # threads 1 and torch's default, two runs each
    python bench/determinism.py --threads 1 2 --facts 25

Not a test: a measurement. Each run is a new process (`ece.api.plan` on the first `--facts` facts of
params.yaml's dataset, one batch; z of that batch saved), so nothing is shared between the two runs
of one thread count but the code and the inputs. It reports, per thread count, whether the two runs'
z are bit-identical, how many facts' rows are, and the largest difference. Writes
reports/determinism.md / .json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from scratch import ROOT, cpu_name, first_facts

OUT_MD = ROOT / "reports" / "determinism.md"
OUT_JSON = ROOT / "reports" / "determinism.json"


def one_run(facts: int, path: Path) -> None:
    """Child process: z of the first batch of `facts` facts (batch size = facts), saved to `path`."""
    from ece.api import plan  # here: the parent process never loads the model
    from ece.data.loaders import load_edits

    p, wb, _ = first_facts(facts)
    p.edit.batch_size = facts
    start = time.perf_counter()
    z = plan(wb, p, load_edits(p.data), log=lambda *_: None)[0].z
    torch.save({"z": z, "seconds": time.perf_counter() - start, "threads": torch.get_num_threads()}, path)


def runs(threads: int | None, facts: int, folder: Path, tag: str) -> list[dict[str, Any]]:
    """Two fresh processes with `threads` OpenMP/MKL threads (None: torch's default)."""
    env = dict(os.environ)
    if threads is not None:
        env |= {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    out = []
    for i in range(2):
        path = folder / f"{tag}-{i}.pt"
        cmd = [sys.executable, __file__, "--child", str(path), "--facts", str(facts)]
        subprocess.run(cmd, env=env, check=True, capture_output=True)
        out.append(torch.load(path))
    return out


def compare(a: torch.Tensor, b: torch.Tensor) -> dict[str, Any]:
    return {
        "bit-identical": bool(torch.equal(a, b)),
        "identical rows": int((a == b).all(dim=1).sum()),
        "rows": len(a),
        "max |Δz|": float((a - b).abs().max()),
        "max |z|": float(a.abs().max()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--facts", type=int, default=25, help="facts in the one batch (default: the default run's batch)")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 0], help="thread counts; 0: torch's default")
    ap.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        one_run(args.facts, args.child)
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for t in args.threads:
            a, b = runs(t or None, args.facts, Path(tmp), f"t{t}")
            rows.append({"threads": a["threads"], "seconds": [a["seconds"], b["seconds"]], **compare(a["z"], b["z"])})
            print(rows[-1])
    OUT_JSON.write_text(json.dumps({"cpu": cpu_name(), "facts": args.facts, "rows": rows}, indent=2) + "\n")
    lines = [
        "# Is z bit-reproducible run to run?",
        "",
        f"`bench/determinism.py --facts {args.facts}` on {cpu_name()}, {time.strftime('%Y-%m-%d')}: z of the "
        "default run's first batch, two fresh processes per thread count.",
        "",
        "| threads | bit-identical | identical rows | max abs diff of z | max abs z | plan seconds (two runs) |",
        "|---|---|---|---|---|---|",
        *(
            f"| {r['threads']} | {'yes' if r['bit-identical'] else 'no'} | {r['identical rows']} of {r['rows']} | "
            f"{r['max |Δz|']:.2e} | {r['max |z|']:.1f} | {r['seconds'][0]:.1f}, {r['seconds'][1]:.1f} |"
            for r in rows
        ),
        "",
    ]
    OUT_MD.write_text("\n".join(lines))
    print(f"-> {OUT_MD}")


if __name__ == "__main__":
    main()
