"""Stage `evaluate`: the unedited model (model.name) vs the edited one (artifacts/edited/model) on ALL
edited facts, after the last batch; the measuring, the curve and the pre cache live in ece.eval.run, the
summary and plots in ece.eval.report.

Outputs: reports/per_fact.parquet (one row per fact and phase), reports/edit_metrics.json (the headline
metrics, first in `dvc exp show`), reports/metrics.json,
reports/summary.md, reports/curve.json, reports/plots/{metrics,curve}.png, and reports/routing.parquet: for a
method that answers through an edit memory (SERAC), which memory entry answered each text of the post
phase (null: the base model alone); empty for the others.

`torchrun --nproc_per_node N -m stages.evaluate` shares the forward batches out over N processes
(ece.model.distributed) with the same numbers; rank 0 alone writes.
"""

from __future__ import annotations

import json
from pathlib import Path

from ece.artifacts import EDITED, PREPARED, ROUTING
from ece.config import Params
from ece.data.facts import read_facts
from ece.data.io import atomic_path, write_json, write_text
from ece.eval.report import headline, plot_curve, plot_metrics, round_floats
from ece.eval.run import run_evaluation
from ece.model import distributed
from ece.stage import run_stage

PER_FACT = "reports/per_fact.parquet"
METRICS = "reports/metrics.json"
EDIT_METRICS = "reports/edit_metrics.json"
SUMMARY = "reports/summary.md"
CURVE = "reports/curve.json"
PLOTS = Path("reports/plots")


def main(p: Params) -> None:
    df, _ = read_facts()
    distributed.start(df.height, "facts", "start at most as many processes as there are facts")
    meta = json.loads((PREPARED.parent / "meta.json").read_text())
    evaluation = run_evaluation(p, df, meta, EDITED)
    if not distributed.is_main():
        return
    with atomic_path(PER_FACT) as tmp:
        evaluation.per_fact.write_parquet(tmp)
    with atomic_path(ROUTING) as tmp:
        evaluation.routing.write_parquet(tmp)
    write_json(METRICS, evaluation.metrics)
    write_text(EDIT_METRICS, headline(evaluation.metrics))
    write_json(CURVE, round_floats(evaluation.curve))
    write_text(SUMMARY, evaluation.summary)
    plot_metrics(evaluation.results, PLOTS / "metrics.png")
    plot_curve(evaluation.curve, p.evaluate.curve_every, PLOTS / "curve.png")


if __name__ == "__main__":
    run_stage(main)
