"""Stage `attribute`: per fact and edited layer, score the neurons of W_out and keep the top mass.

Writes a per-fact table (which neurons each fact uses) and the per-batch aggregated selection
(the columns the update may change). `rs` has no z yet here, so it uses its fallback score; the
apply stage re-scores with r = z − h for the update itself. Seconds per batch go to
reports/attribution_timings.json, outside the cached output.
"""

from __future__ import annotations

import time

import polars as pl

from ece.artifacts import ATTRIBUTION, ATTRIBUTION_TIMINGS
from ece.config import Params
from ece.data.facts import batch_ranges, read_facts
from ece.data.io import atomic_dir, write_json
from ece.edit.attribution import batch_selection, neuron_scores, select_prefix
from ece.edit.keys import keys_and_hidden
from ece.model.workbench import Workbench
from ece.stage import run_stage


def main(p: Params) -> None:
    df, facts = read_facts()
    wb = Workbench.open(p)
    fact_rows, batch_rows, timings = [], [], {}
    for b, rng in enumerate(batch_ranges(len(facts), p.edit.batch_size)):
        start = time.perf_counter()
        batch = [facts[i] for i in rng]
        keys, _ = keys_and_hidden(wb.adapter, wb.tok, batch, wb.templates, p.edit.layers)
        for layer in p.edit.layers:
            scores = neuron_scores(keys[layer], wb.adapter.w_out_weight(layer), p.ece.scorer)
            for fact, s in zip(batch, scores):
                sel = select_prefix(s, p.ece.neuron_threshold)
                fact_rows.append({
                    "id": fact.id, "batch": b, "layer": layer, "n_selected": len(sel),
                    "selected": sel.tolist(), "score_total": float(s.sum()),
                    "top_neuron": int(s.argmax()), "top_share": float(s.max() / s.sum().clamp_min(1e-30)),
                })
            sel = batch_selection(scores, p.ece.neuron_threshold, p.ece.aggregation)
            batch_rows.append({"batch": b, "layer": layer, "n_selected": len(sel), "selected": sel.tolist()})
        timings[b] = time.perf_counter() - start
    with atomic_dir(ATTRIBUTION) as tmp:
        pl.DataFrame(fact_rows).write_parquet(tmp / "facts.parquet")
        pl.DataFrame(batch_rows).write_parquet(tmp / "batches.parquet")
    write_json(ATTRIBUTION_TIMINGS, timings)
    share = pl.DataFrame(batch_rows)["n_selected"].mean() / wb.adapter.inner_size
    print(f"attribute: {len(facts)} facts, scorer {p.ece.scorer}, mean {share:.1%} of columns selected per batch and layer")


if __name__ == "__main__":
    run_stage(main)
