"""What a stage pays before its own work: importing its modules and deriving the context templates.

Every stage is a fresh `python -m stages.<name>` process (DVC runs them so), and on the project's
2-core machine the fixed part of a stage was 10-25 s of a default run's ~100 s outside the stages'
own timed work. Two parts are measured here, side by side, in fresh child processes:

1. Import of each stage's script (`import stages.<name>`), as `make` runs the stages now (Python writes
   bytecode on first import and reads it after) vs as they ran before under PYTHONDONTWRITEBYTECODE
   (set on our CI machines): uv installs no bytecode, so every module but torch's (pip compiles at
   install) was compiled from source in every process. "Before" is reproduced with
   PYTHONDONTWRITEBYTECODE=1 and a PYTHONPYCACHEPREFIX holding torch's bytecode only (hard links).
2. `ece.model.prompts.context_templates` for the real model (every stage that opens it derives them):
   starters of one token length decoded as one batch vs one starter at a time (plain generate per
   starter, as before); the templates must be equal. Timed after a warm-up forward, alternating.

Writes reports/stage_startup.md and .json.

    python bench/stage_startup.py --reps 2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from scratch import ROOT, cpu_name

STAGES = sorted(p.stem for p in (ROOT / "stages").glob("*.py") if p.stem != "__init__")
OUT = ROOT / "reports" / "stage_startup"


def import_seconds(stage: str, before: Path | None) -> float:
    """Wall seconds of `python -c "import stages.<stage>"` in a fresh interpreter (start-up included);
    `before`: a PYTHONPYCACHEPREFIX with torch's bytecode only, and no bytecode written."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONDONTWRITEBYTECODE", "PYTHONPYCACHEPREFIX")}
    if before is not None:
        env |= {"PYTHONDONTWRITEBYTECODE": "1", "PYTHONPYCACHEPREFIX": str(before)}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", f"import stages.{stage}"], cwd=ROOT, env=env, check=True)
    return time.perf_counter() - start


def torch_bytecode_only(prefix: Path) -> None:
    """Mirror torch's installed bytecode under `prefix` as Python looks for it there (the source's
    absolute folder, no __pycache__), hard-linked where the file system allows."""
    import torch

    for pyc in Path(torch.__file__).parent.rglob("__pycache__/*.pyc"):
        target = prefix / pyc.parent.parent.relative_to(pyc.anchor) / pyc.name
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(pyc, target)
        except OSError:
            shutil.copy2(pyc, target)


def templates_child(reps: int) -> dict[str, Any]:
    """Context templates of params.yaml's model, batched vs one starter at a time, alternating."""
    import torch

    from ece.config import load_params
    from ece.model.loading import load_for
    from ece.model.prompts import STARTERS, context_templates, document_start

    p = load_params(ROOT / "params.yaml")
    model, tok = load_for(p)
    n, length = p.z.n_context, p.z.context_length

    def one_at_a_time() -> list[str]:
        out = ["{}"]
        for starter in STARTERS[:n]:
            x = torch.tensor([document_start(tok) + tok(starter).input_ids])
            ids = model.generate(
                x,
                attention_mask=torch.ones_like(x),
                max_new_tokens=length,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
            )[0]
            text = tok.decode(ids, skip_special_tokens=True).replace("{", " ").replace("}", " ")
            out.append(" ".join(text.split()) + ". {}")
        return out

    with torch.no_grad():
        model(torch.tensor([[0] * 16]))  # first touch of the weights and activations, outside the timings
    seconds: dict[str, list[float]] = {"batched": [], "one at a time": []}
    results = {}
    for _ in range(reps):
        for name, fn in (
            ("one at a time", one_at_a_time),
            ("batched", lambda: context_templates(model, tok, n, length)),
        ):
            start = time.perf_counter()
            results[name] = fn()
            seconds[name].append(time.perf_counter() - start)
    assert results["batched"] == results["one at a time"], "batched decoding changed the templates"
    return {"model": p.model.name, "n_context": n, "context_length": length, "seconds": seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--templates-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.templates_child:
        print(json.dumps(templates_child(args.reps)))
        return
    imports: dict[str, dict[str, list[float]]] = {s: {"before": [], "now": []} for s in STAGES}
    with tempfile.TemporaryDirectory(dir=ROOT / ".cache") as prefix:
        torch_bytecode_only(Path(prefix))
        for s in STAGES:
            import_seconds(s, None)  # writes any bytecode still missing
        for _ in range(args.reps):
            for s in STAGES:
                for kind in ("before", "now"):
                    imports[s][kind].append(import_seconds(s, Path(prefix) if kind == "before" else None))
                print(s, {k: round(v[-1], 2) for k, v in imports[s].items()}, flush=True)
    out = subprocess.run(
        [sys.executable, __file__, "--templates-child", "--reps", str(args.reps)],
        capture_output=True,
        text=True,
        check=True,
    )
    templates = json.loads(out.stdout.strip().splitlines()[-1])
    rows = ["| stage | import before, s | import now, s | before / now |", "|---|---:|---:|---:|"]
    total = {"before": 0.0, "now": 0.0}
    for s in STAGES:
        m = {k: statistics.median(v) for k, v in imports[s].items()}
        total = {k: total[k] + m[k] for k in total}
        rows.append(f"| {s} | {m['before']:.2f} | {m['now']:.2f} | {m['before'] / m['now']:.2f}× |")
    rows.append(
        f"| **all {len(STAGES)}** | {total['before']:.1f} | {total['now']:.1f} | {total['before'] / total['now']:.2f}× |"
    )
    t = {k: statistics.median(v) for k, v in templates["seconds"].items()}
    text = (
        f"# Stage start-up: imports and context templates\n\nGenerated by `bench/stage_startup.py --reps {args.reps}` "
        f"on {time.strftime('%Y-%m-%d')} ({os.cpu_count()} CPU cores, {cpu_name()}); medians of {args.reps} fresh "
        "processes each, alternating. Import of each stage's script in a fresh interpreter (start-up included): "
        "before = under PYTHONDONTWRITEBYTECODE with only torch's bytecode installed (pip), every other module "
        "compiled from source in each process (uv installs no bytecode); now = as `make` runs the stages "
        "(bytecode written on first import, then read).\n\n"
        + "\n".join(rows)
        + f"\n\nContext templates of {templates['model']} ({templates['n_context']} starters, "
        f"{templates['context_length']} tokens each), after a warm-up forward: one starter at a time "
        f"{t['one at a time']:.2f} s, starters of one length as one batch {t['batched']:.2f} s "
        f"({t['one at a time'] / t['batched']:.2f}×); the same templates (checked).\n"
    )
    OUT.with_suffix(".md").write_text(text, encoding="utf-8")
    OUT.with_suffix(".json").write_text(json.dumps({"imports": imports, "templates": templates}, indent=1) + "\n")
    print(text)


if __name__ == "__main__":
    main()
