"""How large a covariance sample: C0 from 100k / 400k tokens / the whole shipped corpus, and what changes.

MEMIT estimates C0 from 100,000 Wikipedia articles; the default here is covariance.n_tokens = 100,000
tokens of data/corpus (about 1.2 M tokens in all). For each sample size this runs the real stages in
one scratch folder (.cache/covariance_sample; z does not depend on C0, so each batch's z is computed
once and reused) and records AlphaEdit's null-space size per layer (eigenvalues of C0 below
alphaedit.nullspace_threshold) and the rewrite metrics and perplexity of ECE, MEMIT and AlphaEdit on
the same facts. Fluency and general ability are left out (they move with the edited weights, not
with C0 alone, and cost most of the evaluation time). Writes reports/covariance_sample.md and .json.

    python bench/covariance_sample.py --n-facts 50 --batch-size 25 --tokens 100000 400000 0
    python bench/covariance_sample.py --tokens 0 --keep --set z.dtype=float32   # add a row to the report

--reuse-covariance keeps the scratch folder's C0 when it is the one asked for (the same corpus and model,
and its token count is the size requested, or short of it for the whole corpus): after a run that computed
C0 and stopped in the edits, the row's covariance seconds are then those that run's stage recorded.

With --keep, rows of other sizes already in reports/covariance_sample.json stay (a size run again replaces
its row); every row records the overrides it ran with, so rows run under other settings are visible.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from scratch import ROOT, inside, run_stages

from ece.config import Params, load_params
from ece.data.io import sha256_file

WORK = ROOT / ".cache" / "covariance_sample"
OUT_JSON = ROOT / "reports" / "covariance_sample.json"
OUT_MD = ROOT / "reports" / "covariance_sample.md"
WHOLE = 100_000_000  # more tokens than the corpus holds: the stage stops at its end
REWRITE = ("efficacy", "generalization", "specificity", "score")


def spectrum(threshold: float) -> dict[str, Any]:
    """Per layer: C0's null-space size at `threshold`, its smallest and largest eigenvalue, and tokens used."""
    with inside(WORK):
        tensors = load_file("artifacts/covariance/c0.safetensors")
        n_tokens = json.loads(Path("reports/covariance.json").read_text())["n_tokens"]
    out: dict[str, Any] = {"n_tokens": n_tokens, "layers": {}}
    for name, c0 in sorted(tensors.items()):
        values = torch.linalg.eigvalsh(c0.double())
        out["layers"][name] = {
            "null": int((values < threshold).sum()),
            "dim": len(values),
            "min": float(values[0]),
            "max": float(values[-1]),
        }
    return out


def scratch_covariance(tokens: int, p: Params) -> dict[str, Any] | None:
    """The scratch folder's covariance.json when its C0 is the one `tokens` asks for (0: the whole corpus):
    the same corpus bytes, model and layers, and the size requested (or short of it: the corpus ended)."""
    meta_file = WORK / "reports" / "covariance.json"
    if not (meta_file.exists() and (WORK / "artifacts/covariance/c0.safetensors").exists()):
        return None
    meta = json.loads(meta_file.read_text())
    same = (
        meta["corpus_sha256"] == sha256_file(ROOT / p.covariance.corpus)
        and meta["model"] == p.model.name
        and meta["layers"] == ",".join(map(str, p.edit.layers))
    )
    size = meta["n_tokens"] == tokens if tokens else meta["n_tokens"] < WHOLE
    return meta if same and size else None


def run(tokens: int, methods: list[str], common: list[str], threshold: float, reuse: bool) -> dict[str, Any]:
    size = [f"covariance.n_tokens={tokens or WHOLE}"]
    start = time.perf_counter()
    reused = scratch_covariance(tokens, load_params(ROOT / "params.yaml", [*common, *size])) if reuse else None
    run_stages([*common, *size], WORK, ["prepare"] if reused else ["prepare", "covariance"])
    row: dict[str, Any] = {
        "requested": tokens or "whole corpus",
        "covariance_seconds": reused["seconds"] if reused else round(time.perf_counter() - start, 1),
        "date": time.strftime("%Y-%m-%d"),
        "overrides": common,
    }
    row["spectrum"] = spectrum(threshold)
    row["methods"] = {}
    for method in methods:
        run_stages(
            [*common, *size, f"method={method}"],
            WORK,
            ["attribute", "cluster", "precompute_z", "apply_edits", "evaluate"],
        )
        metrics = json.loads((WORK / "reports/metrics.json").read_text())
        row["methods"][method] = {"pre": metrics["pre"], "post": metrics["post"]}
        print(f"{row['requested']}: {method} " + ", ".join(f"{m} {metrics['post'][m]:.3f}" for m in REWRITE))
    return row


def markdown(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    layers = sorted(rows[0]["spectrum"]["layers"])
    lines = [
        "# Covariance sample size",
        "",
        f"Generated by `bench/covariance_sample.py` on {time.strftime('%Y-%m-%d')}: SmolLM2-135M, {args.n_facts} "
        f"CounterFact facts in batches of {args.batch_size}, every fact scored after the last batch. C0 from the "
        "first N tokens of data/corpus (the default is 100,000; MEMIT uses 100,000 Wikipedia articles). AlphaEdit's "
        f"null space = eigenvectors of C0 with eigenvalue below {args.threshold:g}. Rows may come from separate runs "
        '(`--keep`): compare metrics only between rows run with the same z settings (column "run on, with"); '
        "covariance seconds depend on the machine's load.",
        "",
        "## AlphaEdit null-space size (of the W_out input dimension)",
        "",
        "| tokens | covariance s | run on, with | " + " | ".join(layers) + " |",
        "|---|---|---|" + "---|" * len(layers),
    ]
    for r in rows:
        s = r["spectrum"]
        cells = [f"{s['layers'][l]['null']} / {s['layers'][l]['dim']}" for l in layers]
        run_with = f"{r['date']}, {' '.join(o for o in r['overrides'] if o.startswith('z.')) or 'params.yaml z'}"
        lines.append(f"| {s['n_tokens']:,} | {r['covariance_seconds']} | {run_with} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Rewrite metrics after editing (pre → post) and perplexity",
        "",
        "| tokens | method | " + " | ".join(REWRITE) + " | perplexity |",
        "|---|---|" + "---|" * (len(REWRITE) + 1),
    ]
    for r in rows:
        for method, m in r["methods"].items():
            cells = [f"{m['pre'][k]:.3f} → **{m['post'][k]:.3f}**" for k in REWRITE]
            ppl = f"{m['pre']['perplexity']:.2f} → {m['post']['perplexity']:.2f}"
            lines.append(f"| {r['spectrum']['n_tokens']:,} | {method} | " + " | ".join(cells) + f" | {ppl} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-facts", type=int, default=50)
    ap.add_argument("--batch-size", type=int, default=25)
    ap.add_argument("--tokens", type=int, nargs="+", default=[100_000, 400_000, 0], help="0 = the whole corpus")
    ap.add_argument("--methods", nargs="+", default=["ece", "memit", "alphaedit"])
    ap.add_argument("--threshold", type=float, default=2e-2, help="alphaedit.nullspace_threshold")
    ap.add_argument("--keep", action="store_true", help="keep the report's rows of other sizes")
    ap.add_argument("--set", action="append", default=[], help="extra a.b=value override for every run")
    ap.add_argument("--reuse-covariance", action="store_true", help="keep the scratch C0 when it is the size asked for")
    args = ap.parse_args()
    common = [
        f"data.n_facts={args.n_facts}",
        f"edit.batch_size={args.batch_size}",
        f"alphaedit.nullspace_threshold={args.threshold}",
        "evaluate.gen_per_fact=0",
        "evaluate.general_tasks=[]",
        *args.set,
    ]
    kept = json.loads(OUT_JSON.read_text()) if args.keep and OUT_JSON.exists() else []
    rows = [run(t, args.methods, common, args.threshold, args.reuse_covariance) for t in args.tokens]
    requested = {r["requested"] for r in rows}
    rows = sorted([r for r in kept if r["requested"] not in requested] + rows, key=lambda r: r["spectrum"]["n_tokens"])
    OUT_JSON.write_text(json.dumps(rows, indent=2) + "\n")
    OUT_MD.write_text(markdown(rows, args))
    print(f"-> {OUT_MD}")


if __name__ == "__main__":
    main()
