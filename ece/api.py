"""The programmatic API: edit facts into a loaded model, and evaluate it, in one call each.

    from ece import edit, evaluate
    from ece.model.loading import load_model

    model, tok = load_model("smollm2-135m")
    facts = [{"subject": "Danielle Darrieux", "prompt": "The mother tongue of {} is", "target_new": "English"}]
    result = edit(model, tok, facts, method="ece", covariance="artifacts/covariance/c0.safetensors")
    print(result.ledger.select("batch", "layer", "n_neurons", "delta_norm"))
    print(evaluate(model, tok, result.facts)["summary"])

`edit` runs the pipeline's edit sequence (ece.sequence: plan every batch on the original model, then
apply the batches in order) on an in-memory model; `ece edit` on the command line calls it. Both read
params.yaml (or a Params) exactly as the stages do, so a result here is the pipeline's result.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from ece.artifacts import EDITOR
from ece.audit.ledger import LEDGER_SCHEMA
from ece.config import Params, load_params
from ece.data.facts import Fact, batch_ranges, batch_windows
from ece.data.loaders import dataset_hash, from_records
from ece.data.validation import validate_edits
from ece.editing.clustering import cluster_batch, neuron_sets
from ece.editing.covariance import estimate_covariance, load_covariance
from ece.editing.editor import Editor, LayerChange
from ece.editing.selection import attribute_batch, update_columns
from ece.editing.serac import EditMemory, MemoryRouter, open_router
from ece.editing.trained import edit_memory, load_trained
from ece.editing.zvec import EarlierObjects, batch_z, window_cluster_rows, window_shares, window_start, z_rows
from ece.errors import EceError
from ece.eval.run import evaluate_model
from ece.methods import Method, method_of
from ece.model.adapter import ModelAdapter
from ece.model.workbench import Workbench
from ece.sequence import BatchPlan, Log, apply_plans


@dataclass
class EditResult:
    """What `edit` did: the model (edited in place), per batch its plan and changed columns, the ledger."""

    model: nn.Module
    tokenizer: PreTrainedTokenizerBase
    facts: pl.DataFrame  # the canonical table the batches were cut from (ids, content hashes, prompts)
    plans: list[BatchPlan]
    changes: list[dict[int, LayerChange]]  # per batch and layer: the columns before and after
    ledger: pl.DataFrame  # one row per (batch, layer), ece.audit.ledger.LEDGER_SCHEMA
    runs: list[dict[str, Any]]  # per batch: seconds per phase, session, finish time
    layers: list[dict[str, Any]] = field(default_factory=list)  # per (batch, layer): columns changed, ‖ΔW‖
    memory: EditMemory | None = None  # SERAC: the edits it answers from (the weights are unchanged)


def plan(wb: Workbench, p: Params, facts: pl.DataFrame, log: Log = print) -> list[BatchPlan]:
    """Every batch's plan, in memory, on the model as it is now (call it before any batch is written). z
    is computed a window of `z.window_batches` batches at a time, as the precompute_z stage does."""
    method = method_of(p)
    all_facts = [Fact.from_row(r) for r in facts.iter_rows(named=True)]
    hashes = facts["content_hash"].to_list()
    history = EarlierObjects.of(p, method, wb)
    ranges = batch_ranges(len(all_facts), p.edit.batch_size)
    plans = []
    for window in batch_windows(len(ranges), p.z.window_batches):
        batches = [[all_facts[i] for i in ranges[b]] for b in window]
        seconds: list[dict[str, float]] = [{} for _ in window]
        selections, clusters = [], []
        for w, (b, batch) in enumerate(zip(window, batches)):
            start = time.perf_counter()
            fact_rows, batch_rows = attribute_batch(wb, p, b, batch) if method.selects_columns else ([], [])
            seconds[w]["attribution"] = time.perf_counter() - start
            start = time.perf_counter()
            clusters.append(cluster_batch(p, method, b, [f.id for f in batch], neuron_sets(fact_rows)))
            seconds[w]["clustering"] = time.perf_counter() - start
            selections.append(batch_rows)
        z: list[Tensor | None] = [None] * len(window)
        h: list[Tensor | None] = [None] * len(window)
        rows: list[list[dict[str, Any]]] = [[] for _ in window]
        if method.needs_z:
            start = time.perf_counter()
            span = [f for batch in batches for f in batch]
            labels, anchors, starts = window_start(
                p, method, history, window_cluster_rows(clusters), span, wb.adapter.hidden_size
            )
            res = batch_z(wb, p, method, span, labels, anchors, starts.delta)
            z_seconds = time.perf_counter() - start
            every = z_rows(res, span, anchors[labels], starts.earlier, starts.predicted)
            history.add(span, res.delta)
            shares = window_shares([len(b) for b in batches], [r["steps"] for r in every], z_seconds)
            for w, (cut, share) in enumerate(shares):
                z[w], h[w], rows[w], seconds[w]["z"] = res.z[cut], res.h[cut], every[cut], share
        for w, (b, batch) in enumerate(zip(window, batches)):
            columns = update_columns(wb, p, method, batch, selections[w], z[w], h[w])
            rng = ranges[b]
            plans.append(
                BatchPlan(batch, hashes[rng.start : rng.stop], clusters[w], z[w], rows[w], columns, seconds[w])
            )
            log(
                f"plan: batch {b}, {len(batch)} facts"
                + (f", {sum(r['steps'] for r in rows[w])} z row-steps" if rows[w] else "")
            )
    return plans


def covariance_for(
    wb: Workbench,
    p: Params,
    method: Method,
    covariance: dict[int, Tensor] | str | Path | None,
) -> dict[int, Tensor]:
    """C0 per edited layer: given, read from a file made for this model, or estimated from p.covariance
    (none for a method that does not use it)."""
    layers = list(method.layers)
    if not method.needs_covariance:
        return {}
    if isinstance(covariance, dict):
        missing = [l for l in layers if l not in covariance]
        if missing:
            raise EceError(f"covariance lacks layer(s) {missing}", f"give C0 for every edited layer {layers}")
        return covariance
    if covariance is not None:
        return load_covariance(covariance, wb.fingerprint, layers)
    return estimate_covariance(wb.adapter, wb.tok, layers, p.covariance)[0]


def as_table(facts: pl.DataFrame | Sequence[Fact | dict[str, Any]], max_chars: int) -> pl.DataFrame:
    """The canonical, validated fact table of whatever the caller passed (a prepared table, Facts or dicts)."""
    df = (
        facts
        if isinstance(facts, pl.DataFrame)
        else from_records(
            [
                f
                if isinstance(f, dict)
                else {"id": f.id, "subject": f.subject, "prompt": f.prompt, "target_new": f.target_new}
                for f in facts
            ]
        )
    )
    result = validate_edits(df, max_chars)
    if not result.ok:
        raise EceError(f"{len(result.failures)} validation rule(s) failed:\n{result.summary()}", "fix those facts")
    return df


def edit(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    facts: pl.DataFrame | Sequence[Fact | dict[str, Any]],
    method: str | None = None,
    params: Params | str | Path = "params.yaml",
    overrides: Sequence[str] = (),
    covariance: dict[int, Tensor] | str | Path | None = None,
    editor: str | Path = EDITOR,
    log: Log = print,
) -> EditResult:
    """Edit `facts` into `model` in place, in sequential batches, as the pipeline would; the audit of it.

    `facts`: dicts with subject, prompt (one "{}" for the subject) and target_new (id optional), Facts,
    or a prepared table. `method` overrides params' `method`; `overrides` are `a.b=value` strings.
    `covariance`: C0 per layer, or a c0.safetensors of this model (the covariance stage's); None
    estimates it from `covariance.corpus` (minutes on a CPU). `editor`: the folder of the trained editor
    (train_editor's output) for a method that needs one (MEND); checked against the model, params.yaml
    and the facts.
    """
    if not isinstance(params, Params):
        params = load_params(params, [*overrides, *([f"method={method}"] if method else [])])
    elif method or overrides:
        raise EceError("method/overrides go with a params file, not with a Params object", "set them on the Params")
    p = params
    df = as_table(facts, p.data.max_chars)
    wb = Workbench.of(model, tokenizer, p)
    m = method_of(p)
    trained = load_trained(wb, p, df, Path(editor))
    editing = Editor(
        wb.adapter,
        wb.tok,
        m,
        wb.templates,
        covariance_for(wb, p, m, covariance),
        max_update_norm=p.update.max_update_norm,
        trained=trained,
    )
    plans = plan(wb, p, df, log)
    changes, stored = apply_plans(editing, p, plans, wb.fingerprint, dataset_hash(df), log=log)
    ledger = pl.DataFrame([row for r in stored for row in r["ledger"]], schema=LEDGER_SCHEMA)
    return EditResult(
        model,
        tokenizer,
        df,
        plans,
        changes,
        ledger,
        [r["run"] for r in stored],
        [row for r in stored for row in r["layers"]],
        edit_memory(trained, wb, p, [bp.facts for bp in plans]),
    )


def evaluate(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    facts: pl.DataFrame | Sequence[Fact | dict[str, Any]],
    params: Params | str | Path = "params.yaml",
    overrides: Sequence[str] = (),
    memory: EditMemory | str | Path | None = None,
) -> dict[str, Any]:
    """The evaluate stage's metrics of one model on `facts` (efficacy, generalization, specificity, score,
    fluency where the facts have generation prompts, general ability and perplexity as params say):
    {"summary": {metric: value}, "per_fact": table, "seconds": {part: s}, "routing": table or None}.
    `memory`: the model answers through an edit memory (SERAC): `EditResult.memory`, or the edited model
    folder that holds one; "routing" then says which entry answered each text. Consistency references
    are the stage's business (they need the dataset files); here they are left out."""
    p = params if isinstance(params, Params) else load_params(params, list(overrides))
    router = (
        None
        if memory is None
        else MemoryRouter(memory, ModelAdapter(model), tokenizer)
        if isinstance(memory, EditMemory)
        else open_router(Path(memory), model, tokenizer)
    )
    summary, per_fact, seconds = evaluate_model(model, tokenizer, as_table(facts, p.data.max_chars), p, None, router)
    routing = router.routing() if router is not None else None
    return {"summary": summary, "per_fact": per_fact, "seconds": seconds, "routing": routing}
