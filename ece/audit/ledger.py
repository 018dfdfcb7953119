"""The audit trail of apply_edits: per-batch weight deltas, the ledger, provenance, rollback and diff.

Files (all written by stages/apply_edits.py, atomically, at the end of the stage):

- artifacts/edited/delta-batch-XXXX.safetensors: for every edited layer l, `layer.{l}.cols` (changed
  column indices of W_out^l as a d × f matrix, ascending), `layer.{l}.old` and `layer.{l}.new` (d × |cols|
  float32, the columns right before and right after batch XXXX). Applying `new` batch after batch onto
  the original weights gives the edited model bit for bit; putting back `old` in reverse order undoes
  batches bit for bit.
- artifacts/edited/ledger.parquet: one row per (batch, edited layer) (a batch that wrote no layer, SERAC's:
  one row with a null layer), schema `LEDGER_SCHEMA`: the
  batch's facts (ids, content hashes, clusters, anchors, z losses), the inputs (dataset hash, params
  hash, model fingerprint), the layer's selected neurons, ‖ΔW‖ (Frobenius), the per-column norms of
  ΔW (aligned with `neurons`), the condition number of the solved system. Only what follows from the
  inputs, so an identical recompute writes an identical file (and DVC sees an identical output).
- reports/ledger_runs.json (`LEDGER_RUNS`, not cached by DVC): one row per batch with the facts of
  the run that computed it: seconds per phase, process session, git revision, finish time.
- reports/ledger.md: both, for people.
- artifacts/edited/model/ece_provenance.json (and in every folder `ece rollback` / `ece edit` write):
  which original model the weights derive from (its name and fingerprint), so the covariance
  statistics of the original model can be checked against an edited one.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import asdict
from pathlib import Path
from typing import Any

import polars as pl
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from ece.artifacts import EDITED
from ece.config import Params
from ece.data.io import atomic_path, sha256_json, write_json
from ece.editing.editor import LayerChange
from ece.errors import EceError
from ece.model.adapter import ModelAdapter

LEDGER = EDITED / "ledger.parquet"
LEDGER_RUNS = Path("reports/ledger_runs.json")
LEDGER_MD = Path("reports/ledger.md")
PROVENANCE = "ece_provenance.json"
COND_WARN = 1e12  # float64 keeps ~16 digits; a system this ill-conditioned keeps at most ~4 of them

LEDGER_SCHEMA: dict[str, pl.DataType] = {
    "batch": pl.Int64(),
    "layer": pl.Int64(),
    "n_facts": pl.Int64(),
    "fact_ids": pl.List(pl.Utf8()),
    "content_hashes": pl.List(pl.Utf8()),
    "clusters": pl.List(pl.Int64()),  # cluster label of each fact within its batch
    "anchor_ids": pl.List(pl.Utf8()),  # anchor fact of each fact's cluster
    "z_loss": pl.List(pl.Float64()),  # per fact, from artifacts/z/index.parquet
    "z_nll": pl.List(pl.Float64()),
    "z_steps": pl.List(pl.Int64()),  # gradient steps of each fact's z descent (early stop: fewer)
    "z_start": pl.List(pl.Utf8()),  # the fact whose shared-phase δ each fact's descent started from
    "z_earlier": pl.List(pl.Int64()),  # facts of earlier batches whose mean δ an anchor started from (0: none)
    # facts of earlier batches the predictor of an anchor's start was fitted on (0: not predicted)
    "z_predicted": pl.List(pl.Int64()),
    "neurons": pl.List(pl.Int64()),  # the columns of W_out this batch changed at this layer
    "n_neurons": pl.Int64(),
    "delta_norm": pl.Float64(),  # ‖ΔW‖_F of this batch at this layer
    "col_norms": pl.List(pl.Float64()),  # ‖ΔW[:, n]‖_2 for each n of `neurons`, same order
    "cond": pl.Float64(),  # 2-norm condition number of the solved system (λ·C0_SS + P_SS + K_S K_Sᵀ); NaN: no solve (FT)
    "method": pl.Utf8(),
    "model": pl.Utf8(),
    "model_fingerprint": pl.Utf8(),  # of the ORIGINAL model the batches were applied to
    "dataset_hash": pl.Utf8(),
    "params_hash": pl.Utf8(),
    "checkpoint_key": pl.Utf8(),  # hash of everything the run depends on
}
# Per batch in LEDGER_RUNS: "batch", "n_facts", the seconds of each of RUN_PHASES, "session" (the
# process that computed the batch; differs across a resume), "git_revision", "finished_at" (UTC, ISO 8601).
RUN_PHASES = ("attribution", "clustering", "z", "update")  # "update" = keys + solve + cache (ece.editing.editor.PHASES)


# --- per-batch deltas ---------------------------------------------------------------------------


def delta_name(batch: int) -> str:
    return f"delta-batch-{batch:04d}.safetensors"


def write_delta(path: str | Path, changes: dict[int, LayerChange]) -> None:
    tensors: dict[str, Tensor] = {}
    for l, c in changes.items():
        tensors[f"layer.{l}.cols"] = c.cols.contiguous()
        tensors[f"layer.{l}.old"] = c.old.contiguous()
        tensors[f"layer.{l}.new"] = c.new.contiguous()
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp))


def delta_changes(tensors: dict[str, Tensor]) -> dict[int, LayerChange]:
    """One batch's changes from the tensors of its delta file (`write_delta`'s names), by layer."""
    layers = sorted({int(n.split(".")[1]) for n in tensors if n.endswith(".cols")})
    return {
        l: LayerChange(tensors[f"layer.{l}.cols"], tensors[f"layer.{l}.old"], tensors[f"layer.{l}.new"]) for l in layers
    }


def read_delta(path: str | Path) -> dict[int, LayerChange]:
    try:
        return delta_changes(load_file(str(path)))
    except Exception as exc:  # safetensors raises several types for a damaged file
        raise EceError(f"{path} is not a readable delta file ({exc})", "rerun the apply_edits stage") from None


def delta_files(folder: str | Path = EDITED) -> list[Path]:
    """The per-batch delta files of `folder`, in batch order; refuses a gap in the numbering."""
    folder = Path(folder)
    files = sorted(folder.glob("delta-batch-*.safetensors"))
    if not files:
        raise EceError(
            f"no per-batch deltas (delta-batch-XXXX.safetensors) in {folder}", "run the apply_edits stage first"
        )
    expected = [delta_name(b) for b in range(len(files))]
    if [f.name for f in files] != expected:
        raise EceError(
            f"the delta files in {folder} are not numbered 0..{len(files) - 1}", "rerun the apply_edits stage"
        )
    return files


def load_deltas(folder: str | Path = EDITED) -> list[dict[int, LayerChange]]:
    return [read_delta(f) for f in delta_files(folder)]


@torch.no_grad()
def put_columns(adapter: ModelAdapter, changes: dict[int, LayerChange], which: str) -> None:
    """Write the `new` (redo) or `old` (undo) columns of one batch into the model, bit for bit."""
    for layer, c in changes.items():
        w = adapter.w_out_weight(layer)
        values = c.new if which == "new" else c.old
        if values.shape != (w.shape[0], len(c.cols)):
            raise EceError(
                f"delta of layer {layer} has shape {tuple(values.shape)}, the model's W_out is {tuple(w.shape)}",
                "the deltas belong to another model",
            )
        w[:, c.cols.to(w.device)] = values.to(w)


def check_is_after(adapter: ModelAdapter, deltas: list[dict[int, LayerChange]]) -> None:
    """Refuse weights that are not the state after the last of `deltas` (on the touched columns)."""
    last: dict[tuple[int, int], tuple[int, Tensor]] = {}
    for b, changes in enumerate(deltas):
        for layer, c in changes.items():
            for j, col in enumerate(c.cols.tolist()):
                last[(layer, col)] = (b, c.new[:, j])
    for (layer, col), (b, value) in last.items():
        w = adapter.w_out_weight(layer)
        if not torch.equal(w[:, col], value.to(w)):
            raise EceError(
                f"layer {layer} column {col} of the model is not what batch {b} wrote",
                "the model folder was changed after apply_edits; rerun the apply_edits stage",
            )


def rollback(adapter: ModelAdapter, deltas: list[dict[int, LayerChange]], to_batch: int) -> list[int]:
    """Undo every batch after `to_batch` (-1: all of them), last first; returns the undone batches."""
    n = len(deltas)
    if not -1 <= to_batch < n:
        raise EceError(
            f"--to-batch {to_batch} is out of range: there are {n} batches (0..{n - 1})",
            "use -1 for the original model, or a batch index",
        )
    check_is_after(adapter, deltas)
    undone = list(range(n - 1, to_batch, -1))
    for b in undone:
        put_columns(adapter, deltas[b], "old")
    return undone


# --- inputs of the ledger -----------------------------------------------------------------------


def git_revision(cwd: str | Path = ".") -> str:
    """`git rev-parse HEAD` of the project, or "unknown" outside a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    rev = out.stdout.strip()
    return rev if out.returncode == 0 and rev else "unknown"


def params_hash(p: Params) -> str:
    """sha256 of the whole params dataclass as canonical JSON."""
    return sha256_json(asdict(p))


def layer_summary(change: LayerChange) -> dict[str, Any]:
    diff = change.new.double() - change.old.double()
    return {
        "neurons": change.cols.tolist(),
        "n_neurons": len(change.cols),
        "delta_norm": float(diff.norm()),
        "col_norms": diff.norm(dim=0).tolist(),
    }


# --- provenance ---------------------------------------------------------------------------------


def write_provenance(folder: str | Path, info: dict[str, Any]) -> None:
    write_json(Path(folder) / PROVENANCE, info)


def read_provenance(folder: str | Path) -> dict[str, Any] | None:
    path = Path(folder) / PROVENANCE
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        raise EceError(f"{path} is not valid JSON", "delete it or rerun the step that wrote the folder") from None


# --- reading and rendering the ledger -----------------------------------------------------------


def read_ledger(path: str | Path = LEDGER) -> pl.DataFrame:
    path = Path(path)
    if not path.exists():
        raise EceError(f"{path} not found", "run the apply_edits stage (dvc repro apply_edits) to write the ledger")
    return pl.read_parquet(path)


def read_runs(path: str | Path = LEDGER_RUNS) -> dict[int, dict[str, Any]]:
    """The run facts of each batch (batch → row); empty when the file is absent (it is not a DVC-cached
    output, so e.g. `dvc checkout` of another run does not bring it back)."""
    path = Path(path)
    return {int(r["batch"]): r for r in json.loads(path.read_text())} if path.exists() else {}


def z_start(fact: str, start: str, earlier: int, predicted: int) -> str:
    """Where a fact's z descent started, in words: zero, its anchor's shared δ, the mean δ of earlier
    batches' facts with the same new object (z.warm_from_earlier) or a δ predicted from its new object by
    a fit on earlier batches' facts (z.predict_cold)."""
    if earlier:
        return f"mean δ of {earlier} earlier fact{'s' if earlier > 1 else ''} with its new object"
    if predicted:
        return f"δ predicted from its new object by a fit on {predicted} earlier facts"
    return "zero" if start == fact else f"{start}'s shared δ"


def _short(h: str, n: int = 12) -> str:
    return h[:n] if h else ""


def ledger_markdown(table: pl.DataFrame, runs: dict[int, dict[str, Any]]) -> str:
    """The ledger and the run facts of its batches (`read_runs`) as one markdown report."""
    first = table.row(0, named=True)
    batches = table.group_by("batch", maintain_order=True).first().sort("batch")
    revisions = sorted({r["git_revision"] for r in runs.values()})
    lines = [
        "# Edit ledger",
        "",
        "Written by the apply_edits stage; query it with `ece audit`, undo batches with `ece rollback`.",
        "",
        f"- method: `{first['method']}`, model: `{first['model']}` (fingerprint `{first['model_fingerprint']}`)",
        f"- dataset hash: `{first['dataset_hash']}`",
        f"- git revision: {', '.join(f'`{r}`' for r in revisions) or 'unknown'}",
        f"- params hash: `{first['params_hash']}`",
        f"- checkpoint key: `{first['checkpoint_key']}`",
        f"- batches: {batches.height}, facts: {int(batches['n_facts'].sum())}, "
        f"layers: {sorted(set(table['layer'].drop_nulls().to_list()))}",
        "",
        "## Batches",
        "",
        "| batch | facts | clusters | mean z loss | update s | z s | attribution s | session | finished (UTC) |",
        "|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in batches.iter_rows(named=True):
        loss = sum(r["z_loss"]) / len(r["z_loss"]) if r["z_loss"] else float("nan")
        run = runs.get(r["batch"])
        facts = (
            f"{run['update']:.2f} | {run['z']:.2f} | {run['attribution']:.2f} | {run['session']} | {run['finished_at']}"
            if run
            else "– | – | – | – | –"
        )
        lines.append(f"| {r['batch']} | {r['n_facts']} | {len(set(r['clusters']))} | {loss:.4f} | {facts} |")
    lines += [
        "",
        "## Layers",
        "",
        "| batch | layer | neurons | ‖ΔW‖_F | max column ‖Δ‖ | condition number |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in table.filter(pl.col("layer").is_not_null()).sort("batch", "layer").iter_rows(named=True):
        top = max(r["col_norms"]) if r["col_norms"] else 0.0
        flag = " (ill-conditioned)" if r["cond"] > COND_WARN else ""
        lines.append(
            f"| {r['batch']} | {r['layer']} | {r['n_neurons']} | {r['delta_norm']:.4g} | {top:.4g} | {r['cond']:.3g}{flag} |"
        )
    lines += [
        "",
        "## Facts",
        "",
        "| batch | fact | cluster | anchor | z loss | z NLL | z steps | z started from | content hash |",
        "|---:|---|---:|---|---:|---:|---:|---|---|",
    ]
    for r in batches.iter_rows(named=True):
        for i, fid in enumerate(r["fact_ids"]):
            z = (
                f"{r['z_loss'][i]:.4f} | {r['z_nll'][i]:.4f} | {r['z_steps'][i]} | {z_start(fid, r['z_start'][i], r['z_earlier'][i], r['z_predicted'][i])}"
                if r["z_loss"]
                else "– | – | – | –"
            )  # fine-tuning has no z
            lines.append(
                f"| {r['batch']} | {fid} | {r['clusters'][i]} | {r['anchor_ids'][i]} | {z} "
                f"| `{_short(r['content_hashes'][i])}` |"
            )
    return "\n".join(lines) + "\n"
