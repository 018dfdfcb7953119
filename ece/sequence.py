"""The edit sequence: every batch decided on the original model (a `BatchPlan`), then written in order.

A plan's parts are computed before any batch is written, one function each: the attribution
(ece.editing.selection), the clusters (ece.editing.clustering), z (ece.editing.zvec) and the columns
rule. `apply_plans` then writes the batches in order (the method's update, the cache P, the ledger
rows, optionally a crash-safe checkpoint). This is the one implementation of the sequence: ece.api.edit
plans in memory; the DVC stages compute the parts one stage each, with cached artifacts in between,
and apply_edits reads them back (ece.pipeline.read_plans) into `apply_plans`.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from torch import Tensor

from ece.audit.checkpoint import Checkpoint
from ece.audit.ledger import COND_WARN, git_revision, layer_summary, params_hash, put_columns
from ece.config import Params
from ece.data.facts import Fact
from ece.data.io import sha256_bytes, sha256_json
from ece.editing.editor import Editor, LayerChange
from ece.errors import EceError

Log = Callable[[str], None]


@dataclass
class BatchPlan:
    """What one batch will write, decided on the original model."""

    facts: list[Fact]
    content_hashes: list[str]
    clusters: list[dict[str, Any]]  # per fact: cluster, is_anchor, anchor_id (artifacts/clusters rows)
    z: Tensor | None  # (n, d) target hidden states at the last edited layer; None: the method needs none
    z_rows: list[dict[str, Any]]  # per fact: loss, nll, steps, anchor (the fact its z started from)
    columns: dict[int, Tensor] | None  # per layer, the columns the update may change; None: all
    seconds: dict[str, float] = field(default_factory=dict)  # attribution, clustering, z


def prefix_keys(lineage: str, plans: Sequence[BatchPlan]) -> list[str]:
    """Per batch b, a hash of the lineage and of everything batches 0..b write from (facts, clusters, z,
    columns): equal for two runs exactly when their first b+1 batches would write the same changes."""
    keys, previous = [], lineage
    for bp in plans:
        previous = sha256_json(
            {
                "previous": previous,
                "facts": [[f.id for f in bp.facts], bp.content_hashes],
                "clusters": bp.clusters,
                "z": None if bp.z is None else sha256_bytes(bp.z.contiguous().numpy().tobytes()),
                "z_rows": bp.z_rows,
                "columns": None if bp.columns is None else {str(l): c.tolist() for l, c in sorted(bp.columns.items())},
            }
        )
        keys.append(previous)
    return keys


def _hint_for(exc: EceError, p: Params) -> str | None:
    if "explodes" in str(exc.args[0]):
        return (
            f"{exc.hint}; or raise update.max_update_norm (now {p.update.max_update_norm:g}) if updates this "
            "large are expected. Nothing was saved; the finished batches are kept in the checkpoint"
        )
    return exc.hint


def apply_plans(
    editor: Editor,
    p: Params,
    plans: Sequence[BatchPlan],
    fingerprint: str,
    dataset_hash: str,
    checkpoint: Checkpoint | None = None,
    log: Log = print,
) -> tuple[list[dict[int, LayerChange]], list[dict[str, Any]]]:
    """Write the batches in order; per batch its changed columns and its rows (ledger, layers, run).

    With a checkpoint (the apply_edits stage), the leading batches it holds with matching prefix keys
    are restored onto the weights (with what they carry: P, UltraEdit's moments) instead of
    recomputed, and every finished batch is committed to it before the next one starts: a killed run resumes where it stopped, and a run whose facts
    changed only after batch b starts after batch b−1. Every ledger row also names the method, the
    model (`fingerprint` of the original weights), `dataset_hash` and the params hash; its
    `checkpoint_key` is its batch's prefix key.
    """
    done = checkpoint.resume() if checkpoint is not None else -1
    changes: list[dict[int, LayerChange]] = []
    stored: list[dict[str, Any]] = []
    if checkpoint is not None and done >= 0:
        for b in range(done + 1):
            changes.append(checkpoint.delta(b))
            put_columns(editor.adapter, changes[-1], "new")
            stored.append(checkpoint.rows(b))
            editor.carry(checkpoint.carried(b))
        log(f"apply_edits: resuming from the checkpoint: batches 0..{done} restored, {len(plans) - done - 1} to go")
    delay = float(os.environ.get("ECE_TEST_BATCH_DELAY", "0") or 0)  # test hook: time to kill between batches
    session, revision = uuid.uuid4().hex[:12], git_revision()
    for b in range(done + 1, len(plans)):
        bp = plans[b]
        start = time.perf_counter()
        try:
            batch_changes = editor.apply_batch(bp.facts, bp.z, bp.columns)
        except EceError as exc:
            raise EceError(f"batch {b}: {exc.args[0]}", _hint_for(exc, p)) from None
        seconds = time.perf_counter() - start
        rows = _batch_rows(b, bp, batch_changes, log)
        rows["run"] = {
            "batch": b,
            "n_facts": len(bp.facts),
            **{k: bp.seconds.get(k, 0.0) for k in ("attribution", "clustering", "z")},
            "update": seconds,
            **{f"update_{k}": v for k, v in editor.seconds.items()},
            "z_row_steps": sum(r["steps"] for r in bp.z_rows),
            "session": session,
            "git_revision": revision,
            "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        if checkpoint is not None:
            checkpoint.commit(b, batch_changes, rows, editor.carried)
        changes.append(batch_changes)
        stored.append(rows)
        log(f"batch {b}: {len(bp.facts)} facts, update {seconds:.1f} s")
        if delay > 0:
            time.sleep(delay)
    if checkpoint is not None:  # every batch's rows as committed, restored or not: one form for all
        stored = [checkpoint.rows(b) for b in range(len(plans))]
    common = {
        "method": p.method,
        "model": p.model.name,
        "model_fingerprint": fingerprint,
        "dataset_hash": dataset_hash,
        "params_hash": params_hash(p),
    }
    keys = checkpoint.prefix_keys if checkpoint is not None else [""] * len(plans)
    for b, r in enumerate(stored):
        r["ledger"] = [{**row, **common, "checkpoint_key": keys[b]} for row in r["ledger"]]
    return changes, stored


def _batch_rows(b: int, bp: BatchPlan, changes: dict[int, LayerChange], log: Log) -> dict[str, Any]:
    fact_info = {
        "n_facts": len(bp.facts),
        "fact_ids": [f.id for f in bp.facts],
        "content_hashes": bp.content_hashes,
        "clusters": [r["cluster"] for r in bp.clusters],
        "anchor_ids": [r["anchor_id"] for r in bp.clusters],
        "z_loss": [r["loss"] for r in bp.z_rows],
        "z_nll": [r["nll"] for r in bp.z_rows],
        "z_steps": [r["steps"] for r in bp.z_rows],
        "z_start": [r["anchor"] for r in bp.z_rows],
        "z_earlier": [r["earlier"] for r in bp.z_rows],
        "z_predicted": [r["predicted"] for r in bp.z_rows],
    }
    ledger_rows, layer_rows = [], []
    for l, c in changes.items():
        if c.cond > COND_WARN:
            log(f"warning: batch {b}, layer {l}: ill-conditioned solve (condition number {c.cond:.3g})")
        summary = layer_summary(c)
        layer_rows.append({"batch": b, "layer": l, "n_cols": summary["n_neurons"], "delta_norm": summary["delta_norm"]})
        ledger_rows.append({"batch": b, "layer": l, **fact_info, **summary, "cond": c.cond})
    if not changes:  # no weight written (SERAC: the facts went into its edit memory); the facts are still audited
        no_change = {"neurons": [], "n_neurons": 0, "delta_norm": 0.0, "col_norms": [], "cond": float("nan")}
        ledger_rows.append({"batch": b, "layer": None, **fact_info, **no_change})
    return {"batch": {"batch": b, "n_facts": len(bp.facts)}, "layers": layer_rows, "ledger": ledger_rows}
