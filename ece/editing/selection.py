"""The columns a batch may change: ECE's attribution applied to one batch of facts.

Before z exists (the attribute stage): per fact and layer the selected neurons, and per layer the
batch's aggregated selection. Once z is known (apply_edits, ece.edit): the columns rule the update
applies, re-scored against r = z − h for the `rs` scorer.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ece.config import Params
from ece.data.facts import Fact
from ece.editing.attribution import batch_selection, neuron_scores, select_prefix
from ece.editing.keys import keys_and_hidden
from ece.methods import Method
from ece.model.workbench import Workbench


def attribute_batch(
    wb: Workbench, p: Params, b: int, batch: list[Fact]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Neuron attribution of batch `b`: per fact and layer, the selected neurons (the rows of
    artifacts/attribution/facts.parquet), and per layer the batch's aggregated selection (the rows of
    batches.parquet: the columns the update may change). `rs` has no z yet here, so it uses its fallback
    score; `update_columns` re-scores with r = z − h for the update itself."""
    keys, _ = keys_and_hidden(wb.adapter, wb.tok, batch, wb.templates, p.edit.layers)
    fact_rows, batch_rows = [], []
    for layer in p.edit.layers:
        scores = neuron_scores(keys[layer], wb.adapter.w_out_weight(layer), p.ece.scorer)
        for fact, s in zip(batch, scores):
            sel = select_prefix(s, p.ece.neuron_threshold)
            fact_rows.append(
                {
                    "id": fact.id,
                    "batch": b,
                    "layer": layer,
                    "n_selected": len(sel),
                    "selected": sel.tolist(),
                    "score_total": float(s.sum()),
                    "top_neuron": int(s.argmax()),
                    "top_share": float(s.max() / s.sum().clamp_min(1e-30)),
                }
            )
        sel = batch_selection(scores, p.ece.neuron_threshold, p.ece.aggregation)
        batch_rows.append({"batch": b, "layer": layer, "n_selected": len(sel), "selected": sel.tolist()})
    return fact_rows, batch_rows


def update_columns(
    wb: Workbench,
    p: Params,
    method: Method,
    batch: list[Fact],
    batch_rows: list[dict[str, Any]],
    z: Tensor | None,
    h: Tensor | None,
) -> dict[int, Tensor] | None:
    """The columns the update may change per layer: None (all) unless the method selects columns;
    then the attributed selection (`batch_rows`: the batch's rows of attribute_batch), or for `rs` a
    re-scoring against r = z − h on the original model (as a change of W_out's output: `w_out_target`)."""
    if not method.selects_columns:
        return None
    if p.ece.scorer != "rs":
        selected = {r["layer"]: r["selected"] for r in batch_rows}
        return {l: torch.tensor(selected[l], dtype=torch.long) for l in method.layers}
    assert z is not None and h is not None
    keys, _ = keys_and_hidden(wb.adapter, wb.tok, batch, wb.templates, p.edit.layers)
    return {
        l: batch_selection(
            neuron_scores(keys[l], wb.adapter.w_out_weight(l), "rs", wb.adapter.w_out_target(l, keys[l], z - h)),
            p.ece.neuron_threshold,
            p.ece.aggregation,
        )
        for l in p.edit.layers
    }
