"""What a predicted start (`z.predict_cold`) costs, and where: two finished scale rows compared fact by fact.

    python bench/predict_cost.py                       # the pairs below, rows read from reports/scale.json
    python bench/predict_cost.py --pair cf-ece cf-ece-calibrated

Not a test: a measurement of runs already made (`bench/scale.py`). For a row without the prediction
(`base`) and one with it (`variant`) on the same facts it reads, from this machine's DVC cache, every
fact's post-edit scores (reports/per_fact.parquet) and its z (artifacts/z: steps, final δ, where its
start came from), and reports:

- the change in efficacy / generalization / specificity by how the variant started the fact (a
  predicted start, the mean δ of earlier facts with its object, a member of its anchor's group, zero),
  and for the facts whose z is bit-identical in both runs — facts whose own z did not change, so any
  change in their scores comes through the other facts' updates;
- the geometry of all facts' final δ in each run: ‖mean δ‖ / mean ‖δ‖ (1: all δ point the same way; 0:
  they cancel), the share of Σ‖δ‖² along the top singular direction, ‖Σ δ‖, and the mean cosine of a
  fact's δ in the variant with its δ in the base run;
- for each base run, what the prediction is made of: `DeltaPredictor` (z.predict_ridge) fitted on the
  final δ of the batches before a split and applied to the split batch's facts whose object none of
  those had, against those facts' own δ — the mean cosine, the share of ‖p‖² and of ‖δ‖² along the
  fitted facts' mean δ, the cosine of the mean δ alone, the cosine of the parts orthogonal to the mean
  (what is specific to the object), and the least-squares scale of p onto δ.

Rows run before the z index had a `predicted` column (before 063d1e0) ran `z.predict_cold: 1` without
calibration, where every anchor of batch ≥ 1 whose object no earlier fact had was predicted; that rule
stands in for the column there. Writes reports/predict_cost.md / .json.
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path
from typing import Any

import polars as pl
import torch
import torch.nn.functional as F
from experiments import required_output
from rows import fmt
from scratch import cpu_name, first_facts, stored_facts, stored_z
from torch import Tensor

from ece.editing.zvec import DeltaPredictor, object_embeddings

ROOT = Path(__file__).resolve().parents[1]
SCALE_JSON = ROOT / "reports" / "scale.json"
OUT_MD = ROOT / "reports" / "predict_cost.md"
OUT_JSON = ROOT / "reports" / "predict_cost.json"
PAIRS = [  # (without the prediction, with it), same dataset, nearest code
    ("zsre-ece-nopredict", "zsre-ece@90ea923"),
    ("zsre-ece-nopredict", "zsre-ece-calibrated"),
    ("cf-ece-warm0.75", "cf-ece-predict1"),
    ("cf-ece-warm0.75", "cf-ece-calibrated"),
]
SCORES = ("efficacy", "generalization", "specificity")
KINDS = ("predicted", "earlier δ", "member", "zero", "z identical in both")
SPLITS = (1, 3, 5)  # batches before which the prediction is fitted


def coherence(delta: Tensor) -> float:
    """‖mean δ‖ / mean ‖δ‖ over facts (rows): 1 when every δ points the same way, 0 when they cancel."""
    return float(delta.mean(0).norm() / delta.norm(dim=1).mean())


def top_direction_share(delta: Tensor) -> float:
    """The share of Σ‖δ‖² along the rows' top singular direction."""
    return float(torch.linalg.svdvals(delta)[0] ** 2 / (delta**2).sum())


def share_along(rows: Tensor, unit: Tensor) -> float:
    """The share of the rows' Σ‖x‖² along the unit direction `unit`."""
    return float((rows @ unit).square().sum() / rows.square().sum())


def orthogonal(rows: Tensor, unit: Tensor) -> Tensor:
    """The rows without their component along the unit direction `unit`."""
    return rows - (rows @ unit)[:, None] * unit[None]


def start_kind(index: pl.DataFrame) -> pl.Series:
    """How each fact's z started: `predicted`, `earlier δ`, `member` (of an anchor's group) or `zero`."""
    if "predicted" not in index.columns:  # before 063d1e0: predict_cold 1, uncalibrated (module docstring)
        cold = (pl.col("anchor") == pl.col("id")) & (pl.col("earlier") == 0) & (pl.col("batch") >= 1)
        index = index.with_columns(cold.cast(pl.Int64).alias("predicted"))
    return index.select(
        pl.when(pl.col("predicted") > 0)
        .then(pl.lit("predicted"))
        .when(pl.col("earlier") > 0)
        .then(pl.lit("earlier δ"))
        .when(pl.col("anchor") != pl.col("id"))
        .then(pl.lit("member"))
        .otherwise(pl.lit("zero"))
    ).to_series()


def load_run(rev: str) -> tuple[pl.DataFrame, Tensor]:
    """Per fact (z index order): post-edit scores, z steps and start kind; and the final δ (n, d)."""
    index, delta = _z_of(rev)
    post = pl.read_parquet(io.BytesIO(_output(rev, "reports/per_fact.parquet"))).filter(pl.col("phase") == "post")
    facts = index.select("id", "batch", "steps").with_columns(start_kind(index).alias("kind"))
    return facts.join(post.select("id", *SCORES), on="id", how="left", maintain_order="left"), delta


def _output(rev: str, path: str) -> bytes:
    return required_output(rev, path, rev, "run the row again: bench/scale.py")


def _z_of(rev: str) -> tuple[pl.DataFrame, Tensor]:
    """A run's z index and every fact's final δ (n, d), float64, in index order."""
    index, delta = stored_z(lambda path: _output(rev, path))
    return index, delta.double()


def prediction_parts(rev: str, ridge: float, embed: Any) -> list[dict[str, Any]]:
    """What a prediction fitted on a run's own δ is made of, per split (module docstring)."""
    index, delta = _z_of(rev)
    facts = stored_facts(lambda path: _output(rev, path), index["id"].to_list())
    x, batch = embed(facts), index["batch"].to_list()
    out = []
    for split in (s for s in SPLITS if s < max(batch)):
        seen = {f.target_new for f, b in zip(facts, batch) if b < split}
        fit = torch.tensor([b < split for b in batch])
        test = torch.tensor([b == split and f.target_new not in seen for f, b in zip(facts, batch)])
        predictor = DeltaPredictor(ridge, 1)
        predictor.add(x[fit], delta[fit].float())
        p, d = predictor.predict(x[test]).double(), delta[test]
        mean = delta[fit].mean(0)
        unit = mean / mean.norm()

        out.append(
            {
                "split": split,
                "facts fitted": int(fit.sum()),
                "facts predicted": int(test.sum()),
                "cos(p, δ)": float(F.cosine_similarity(p, d, dim=1).mean()),
                "‖p‖² along mean δ": share_along(p, unit),
                "‖δ‖² along mean δ": share_along(d, unit),
                "cos(mean δ, δ)": float(F.cosine_similarity(mean.expand_as(d), d, dim=1).mean()),
                "cos of specific parts": float(
                    F.cosine_similarity(orthogonal(p, unit), orthogonal(d, unit), dim=1).mean()
                ),
                "LS scale": float((p * d).sum() / p.square().sum()),
            }
        )
    return out


def delta_geometry(delta: Tensor) -> dict[str, float]:
    """How aligned and how large a run's final δ (n, d) are: what the updates pile up."""
    return {
        "coherence": coherence(delta),
        "top direction share": top_direction_share(delta),
        "norm of sum": float(delta.sum(0).norm()),
        "mean norm": float(delta.norm(dim=1).mean()),
    }


GEOMETRY_DIGITS = (("coherence", 3), ("top direction share", 3), ("norm of sum", 0), ("mean norm", 1))


def geometry_report(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], str]:
    """`--geometry`: the final δ's geometry of single rows (no pair needed: a row whose base run is not
    on this machine can still be set beside the base's numbers in reports/predict_cost.md)."""
    found = [{"row": r["row"], "code": r.get("code"), **delta_geometry(_z_of(r["rev"])[1])} for r in rows]
    head = ["row", "code", *(name for name, _ in GEOMETRY_DIGITS)]
    lines = [
        "# Final δ geometry of single scale rows",
        "",
        f"Generated by `bench/predict_cost.py --geometry` ({cpu_name()}): every fact's final δ of each row, from "
        "this machine's DVC cache; the same measures as reports/predict_cost.md's \"final δ of all facts\" "
        "tables (coherence ‖mean δ‖ / mean ‖δ‖; the top singular direction's share of Σ‖δ‖²; ‖Σδ‖; mean ‖δ‖).",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for g in found:
        lines.append(
            f"| {g['row']} | {g['code']} | "
            + " | ".join(fmt(g[name], digits) for name, digits in GEOMETRY_DIGITS)
            + " |"
        )
    return found, "\n".join([*lines, ""])


def compare(base: dict[str, Any], variant: dict[str, Any]) -> dict[str, Any]:
    """One pair's tables (module docstring)."""
    a, da = load_run(base["rev"])
    b, db = load_run(variant["rev"])
    if a["id"].to_list() != b["id"].to_list():
        raise SystemExit(f"{base['row']} and {variant['row']} did not edit the same facts in the same order")
    same = (da == db).all(dim=1)
    groups = {kind: b["kind"] == kind for kind in KINDS[:-1]} | {KINDS[-1]: pl.Series(same.tolist())}
    by_kind = []
    for kind, mask in groups.items():
        n = int(mask.sum())
        row: dict[str, Any] = {"kind": kind, "facts": n}
        for s in SCORES:
            row[f"Δ{s}"] = float((b[s] - a[s]).filter(mask).mean()) if n else None
        row["steps base"] = float(a["steps"].filter(mask).mean()) if n else None
        row["steps variant"] = float(b["steps"].filter(mask).mean()) if n else None
        by_kind.append(row)
    geometry: dict[str, Any] = {name: delta_geometry(d) for name, d in (("base", da), ("variant", db))}
    geometry["mean cosine base-variant"] = float(F.cosine_similarity(da, db, dim=1).mean())
    return {
        "base": base["row"],
        "variant": variant["row"],
        "codes": [base.get("code"), variant.get("code")],
        "by_kind": by_kind,
        "geometry": geometry,
        "post": {"base": base["post"], "variant": variant["post"]},
    }


def markdown(results: list[dict[str, Any]], parts: dict[str, list[dict[str, Any]]]) -> str:
    lines = ["# What a predicted start costs, and where", "", (__doc__ or "").split("\n\n", 2)[2].strip(), ""]
    for r in results:
        g, pb, pv = r["geometry"], r["post"]["base"], r["post"]["variant"]
        lines += [
            f"## {r['base']} → {r['variant']} (code {r['codes'][0]} → {r['codes'][1]})",
            "",
            "Whole run: "
            + ", ".join(f"{s} {fmt(pb[s])} → {fmt(pv[s])}" for s in SCORES)
            + f", perplexity {fmt(pb['perplexity'], 2)} → {fmt(pv['perplexity'], 2)}.",
            "",
            "| start (variant) | facts | Δefficacy | Δgeneralization | Δspecificity | z steps base | z steps variant |",
            "|---|---|---|---|---|---|---|",
        ]
        for k in r["by_kind"]:
            lines.append(
                f"| {k['kind']} | {k['facts']} | "
                + " | ".join(fmt(k[f"Δ{s}"]) for s in SCORES)
                + f" | {fmt(k['steps base'], 1)} | {fmt(k['steps variant'], 1)} |"
            )
        lines += [
            "",
            "| final δ of all facts | base | variant |",
            "|---|---|---|",
            *(
                f"| {name} | {fmt(g['base'][name], digits)} | {fmt(g['variant'][name], digits)} |"
                for name, digits in GEOMETRY_DIGITS
            ),
            "",
            f"Mean cosine of a fact's δ in the variant with its δ in the base run: {fmt(g['mean cosine base-variant'])}.",
            "",
        ]
    for row, splits in parts.items():
        head = list(splits[0]) if splits else []
        lines += [f"## What the prediction is made of: fitted on {row}'s own δ", ""]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += [
            "| " + " | ".join(str(v) if isinstance(v, int) else fmt(v) for v in x.values()) + " |" for x in splits
        ]
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pair", nargs=2, action="append", metavar=("BASE", "VARIANT"), help="scale rows (repeatable)")
    ap.add_argument(
        "--geometry",
        nargs="+",
        metavar="ROW",
        help="only the final δ geometry of these rows -> reports/delta_geometry.*",
    )
    args = ap.parse_args()
    rows = {r["row"]: r for r in json.loads(SCALE_JSON.read_text())}
    pairs = [tuple(p) for p in args.pair] if args.pair else PAIRS
    unknown = [name for name in args.geometry or [pair_row for pair in pairs for pair_row in pair] if name not in rows]
    if unknown:
        raise SystemExit(f"rows {unknown} are not in {SCALE_JSON} (run bench/scale.py report after they finish)")
    if args.geometry:
        found, md = geometry_report([rows[name] for name in args.geometry])
        (ROOT / "reports" / "delta_geometry.json").write_text(json.dumps(found, indent=2) + "\n")
        (ROOT / "reports" / "delta_geometry.md").write_text(md)
        print(f"{len(found)} rows -> reports/delta_geometry.md")
        return
    results = [compare(rows[b], rows[v]) for b, v in pairs]
    p, wb, _ = first_facts(1)
    parts = {
        b: prediction_parts(rows[b]["rev"], p.z.predict_ridge, lambda fs: object_embeddings(wb.adapter, wb.tok, fs))
        for b in dict.fromkeys(b for b, _ in pairs)
    }
    OUT_JSON.write_text(json.dumps({"pairs": results, "prediction": parts}, indent=2) + "\n")
    OUT_MD.write_text(markdown(results, parts))
    print(f"{len(results)} pairs -> {OUT_MD}, {OUT_JSON}")


if __name__ == "__main__":
    main()
