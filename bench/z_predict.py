"""How far a predicted start takes a new object's z (`z.predict_cold`), from a finished run's own δ.

    python bench/z_predict.py .cache/speed/ece-warm0.75-2000x100 --splits 1 5 10

Not a test: a measurement. It reads the final δ of every fact of a finished multi-batch run (its
scratch folder's artifacts/z: a `bench/speed.py --batches N` configuration), fits `DeltaPredictor` on
the batches before each split, and on the anchors of the split batch whose new object no earlier
fact had (the facts `z.predict_cold` starts) reports: the cosine of the prediction with the fact's
own final δ, and z of those facts run again from `gain` × a start (gain 0: from zero, as the run did)
— row-steps, mean ‖δ‖, target NLL and KL at the end, and how much of the new δ lies along the
fitted facts' mean δ (the direction every fact's δ shares, which predicted starts leave in the final
δ and the updates pile up: reports/predict_cost.md). Writes reports/z_predict.md / .json.

Starts (`--starts`): `prediction` (what `z.predict_cold` uses); `mean` (the fitted facts' mean δ, the
same for every fact: the shared direction alone); `centered` (the prediction without its component
along that mean: what is left that is specific to the object).

    python bench/z_predict.py .cache/speed/ece-2000x100 --splits 1 5 10 --gains 0 1 \
        --starts prediction mean centered --out z_predict_parts
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from predict_cost import coherence, orthogonal, share_along
from scratch import ROOT, cpu_name, first_facts, stored_facts, stored_z
from torch import Tensor

from ece.data.facts import Fact
from ece.editing.zvec import DeltaPredictor, build_problem, object_embeddings, two_step_z

GAINS = (0.0, 1.0, 2.0, 3.0)
STARTS = ("prediction", "mean", "centered")


def start_from(kind: str, prediction: Tensor, mean: Tensor) -> Tensor:
    """The start of one kind (module docstring) for each predicted fact, before its gain."""
    if kind == "prediction":
        return prediction
    if kind == "mean":
        return mean.expand_as(prediction)
    return orthogonal(prediction, mean / mean.norm())


def stored_run(run: Path) -> tuple[list[Fact], Tensor, Any]:
    """The run's facts in index order, their final δ (n, d) and batch numbers."""

    def read(path: str) -> bytes:
        return (run / path).read_bytes()

    index, delta = stored_z(read)
    return stored_facts(read, index["id"].to_list()), delta.float(), index["batch"].to_numpy()


def measure(run: Path, splits: list[int], gains: list[float], starts: list[str]) -> list[dict[str, Any]]:
    p, wb, _ = first_facts(1)
    facts, delta, batch = stored_run(run)
    features = object_embeddings(wb.adapter, wb.tok, facts)
    layer = p.edit.layers[-1]
    rows = []
    for split in splits:
        seen = {f.target_new for f, b in zip(facts, batch) if b < split}
        cold, firsts = [], set()
        for i, (f, b) in enumerate(zip(facts, batch)):
            if b == split and f.target_new not in seen and f.target_new not in firsts:
                cold.append(i)  # a new object's first fact in the batch: the anchor that predict_cold starts
                firsts.add(f.target_new)
        fit = torch.tensor(batch < split)
        predictor = DeltaPredictor(p.z.predict_ridge, 1)
        predictor.add(features[fit], delta[fit])
        prediction = predictor.predict(features[cold])
        assert prediction is not None
        cosine = float(F.cosine_similarity(prediction, delta[cold], dim=1).mean())
        mean = delta[fit].mean(0)
        problem = build_problem(wb.adapter, wb.tok, [facts[i] for i in cold], layer, wb.templates)
        own = torch.arange(len(cold))
        runs = [("zero", 0.0)] if 0.0 in gains else []
        runs += [(kind, gain) for kind in starts for gain in gains if gain]
        for kind, gain in runs:
            start = gain * start_from(kind, prediction, mean) if gain else None
            res = two_step_z(problem, wb.adapter, layer, own, own, p.z, start)
            rows.append(
                {
                    "split": split,
                    "fitted_facts": int(fit.sum()),
                    "cold_anchors": len(cold),
                    "cosine": cosine,
                    "start": kind,
                    "gain": gain,
                    "row_steps": int(res.steps.sum()) + len(cold),  # + each fact's final forward (as the ledger counts)
                    "delta_norm": float(res.delta.norm(dim=1).mean()),
                    "nll": float(res.losses.nll.mean()),
                    "kl": float(res.losses.kl.mean()),
                    "along_mean": share_along(res.delta.float(), mean / mean.norm()),
                    "coherence": coherence(res.delta.float()),
                }
            )
            print(rows[-1], flush=True)
    return rows


def render(run: Path, rows: list[dict[str, Any]]) -> str:
    lines = [
        "# Predicted starts for new objects (`z.predict_cold`)",
        "",
        f"Generated by `bench/z_predict.py` ({cpu_name()}) from the final δ of the run in `{run}`. For each split "
        "batch: a ridge fit (`z.predict_ridge`) of δ on the first-token input embedding of the new object, over "
        "every fact of the earlier batches; the anchors of the split batch whose object no earlier fact had; the "
        "cosine of their prediction with their own final δ; their z again from gain × a start (gain 0: "
        "from zero), with params.yaml's z settings. Starts: prediction (`z.predict_cold`'s); mean (the fitted "
        "facts' mean δ, the same for every fact); centered (the prediction without its component along that "
        "mean). Along mean: the share of the new δ's Σ‖δ‖² along the fitted facts' mean δ; coherence: "
        "‖mean δ‖ / mean ‖δ‖ over the new δ (both higher = more of the direction all δ share, which the "
        "updates pile up: reports/predict_cost.md).",
        "",
        "| split batch | fitted facts | new-object anchors | cosine | start | gain | z row-steps | mean ‖δ‖ "
        "| target NLL | KL | along mean | coherence |",
        "|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['split']} | {r['fitted_facts']} | {r['cold_anchors']} | {r['cosine']:.3f} | "
            f"{r.get('start', 'prediction' if r['gain'] else 'zero')} | {r['gain']:g} | {r['row_steps']} | "
            f"{r['delta_norm']:.1f} | {r['nll']:.3f} | {r['kl']:.3f} | {fmt_share(r.get('along_mean'))} | "
            f"{fmt_share(r.get('coherence'))} |"
        )
    return "\n".join(lines) + "\n"


def fmt_share(x: float | None) -> str:
    return "–" if x is None else f"{x:.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, help="a finished multi-batch scratch folder (bench/speed.py --batches N)")
    ap.add_argument(
        "--splits", type=int, nargs="+", default=[1, 5, 10], help="batches to predict (fit on those before)"
    )
    ap.add_argument("--gains", type=float, nargs="+", default=list(GAINS), help="factors on each start (0: zero)")
    ap.add_argument("--starts", nargs="+", default=["prediction"], choices=STARTS, help="start kinds to run")
    ap.add_argument("--out", default="z_predict", help="report name: reports/<out>.md / .json")
    ap.add_argument("--render", action="store_true", help="only write the report again from reports/<out>.json")
    args = ap.parse_args()
    if args.render:
        rows = json.loads((ROOT / "reports" / f"{args.out}.json").read_text())
        (ROOT / "reports" / f"{args.out}.md").write_text(render(args.run, rows))
        return
    rows = measure(args.run.resolve(), args.splits, args.gains, args.starts)
    (ROOT / "reports" / f"{args.out}.json").write_text(json.dumps(rows, indent=2) + "\n")
    (ROOT / "reports" / f"{args.out}.md").write_text(render(args.run, rows))


if __name__ == "__main__":
    sys.exit(main())
