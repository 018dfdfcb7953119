"""A trained editor on disk, checked before use, and the resumable state of its training.

artifacts/editor/ holds, for a method with a trained editor (MEND):
- `editor.safetensors`: the editor's tensors;
- `editor.json`: its config: the method, the fingerprint of the base model it was trained on, the
  inputs it was trained from (the train_editor and method params, the training file's sha256), the
  format of its records, its steps and held-out loss;
- `train_facts.parquet`: id, fact key and split of every training and held-out record, so that an
  edit run can refuse to edit a fact the editor has seen.
For every other method it holds only `editor.json` = {"trained_editor": null}: the same bytes for
every such method, so switching between them changes no input of apply_edits.

No Python object serialisation anywhere: tensors in safetensors, everything else in JSON or parquet. The training
checkpoint (machine-local, under the scratch folder) is the same pair: a safetensors file of every
tensor (editor, best editor so far, optimiser moments) and a JSON of the rest.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import polars as pl
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from ece.data.facts import Fact
from ece.data.io import atomic_dir, write_json
from ece.errors import EceError
from ece.model.adapter import ModelAdapter

CONFIG, TENSORS, TRAIN_FACTS = "editor.json", "editor.safetensors", "train_facts.parquet"
MARKER = {"trained_editor": None}
FIX = "run `dvc repro train_editor` (or ece.edit with the editor trained for this model and params)"


class TrainedEditor(Protocol):
    """What the Editor asks of a trained editor: the change of each layer's W_out for a batch of facts,
    computed on the model's current weights."""

    layers: list[int]

    def deltas(self, adapter: ModelAdapter, tok: PreTrainedTokenizerBase, facts: list[Fact]) -> dict[int, Tensor]: ...


def write_marker(folder: Path) -> None:
    """The output of train_editor for a method that needs no trained editor."""
    with atomic_dir(folder) as tmp:
        write_json(tmp / CONFIG, MARKER)


def save_editor(folder: Path, tensors: dict[str, Tensor], config: dict[str, Any], train_facts: pl.DataFrame) -> None:
    with atomic_dir(folder) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / TENSORS))
        write_json(tmp / CONFIG, config)
        train_facts.write_parquet(tmp / TRAIN_FACTS)


def read_editor(
    folder: Path, method: str, fingerprint: str, inputs: dict[str, Any]
) -> tuple[dict[str, Tensor], dict[str, Any], pl.DataFrame]:
    """The tensors, config and training facts of the editor in `folder`, refused unless it was trained
    for `method` on this model (`fingerprint`) from exactly `inputs` (what params.yaml names now)."""
    try:
        config = json.loads((folder / CONFIG).read_text())
    except FileNotFoundError:
        raise EceError(f"no trained editor in {folder} (method {method} needs one)", FIX) from None
    except (OSError, ValueError) as exc:
        raise EceError(f"{folder / CONFIG} is not a readable editor config ({exc})", FIX) from None
    if not isinstance(config, dict) or config.get("method") != method:
        found = config.get("method") if isinstance(config, dict) else None
        held = f"method {found}'s" if found else "none: the marker of a method that needs no trained editor"
        raise EceError(f"{folder} holds no editor trained for method {method} (it holds {held})", FIX)
    if config.get("model_fingerprint") != fingerprint:
        raise EceError(
            f"the editor in {folder} was trained for another model (fingerprint {config.get('model_fingerprint')}, "
            f"this model is {fingerprint})",
            FIX,
        )
    stored = config.get("inputs") or {}
    stale = sorted(k for k in inputs.keys() | stored.keys() if stored.get(k) != inputs.get(k))
    if stale:
        raise EceError(
            f"the editor in {folder} was trained from other data or settings than params.yaml names now: "
            + "; ".join(f"{k}: {stored.get(k)} there, {inputs.get(k)} here" for k in stale),
            FIX,
        )
    try:
        tensors = load_file(str(folder / TENSORS))
        train_facts = pl.read_parquet(folder / TRAIN_FACTS)
    except Exception as exc:  # safetensors and parquet raise several types for a damaged file
        raise EceError(f"the editor in {folder} is missing or damaged ({type(exc).__name__}: {exc})", FIX) from None
    bad = [k for k, v in tensors.items() if not torch.isfinite(v).all()]
    if bad:
        raise EceError(f"the editor in {folder} has NaN or Inf in {bad}", FIX)
    return tensors, config, train_facts


@dataclass
class Trained:
    """What a method's trainer returns: the editor to save, its config, its training curve."""

    tensors: dict[str, Tensor]  # the editor with the lowest held-out loss
    config: dict[str, Any]  # what rebuilds it, and where training stopped
    curve: list[dict[str, float]]  # per evaluation: step, train and held-out losses, seconds


class TrainingCheckpoint:
    """The state of an interrupted training run, in one folder per training lineage (a hash of everything
    the result depends on): written whole after each evaluation, read back by the next run."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def save(self, tensors: dict[str, Tensor], state: dict[str, Any]) -> None:
        with atomic_dir(self.folder) as tmp:
            save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(tmp / "state.safetensors"))
            write_json(tmp / "state.json", state)

    def load(self) -> tuple[dict[str, Tensor], dict[str, Any]] | None:
        """The last saved state, or None when there is none (or it cannot be read: then training restarts)."""
        try:
            return load_file(str(self.folder / "state.safetensors")), json.loads(
                (self.folder / "state.json").read_text()
            )
        except Exception:  # a half-written or damaged checkpoint is no checkpoint
            return None

    def clear(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def optimizer_tensors(opt: torch.optim.Optimizer, prefix: str) -> dict[str, Tensor]:
    """An optimiser's per-parameter state as flat named tensors (Adam: step, exp_avg, exp_avg_sq)."""
    return {
        f"{prefix}.{i}.{name}": value
        for i, state in opt.state_dict()["state"].items()
        for name, value in state.items()
        if isinstance(value, Tensor)
    }


def load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, Tensor], prefix: str) -> None:
    """Put back what `optimizer_tensors` took (the param groups are the optimiser's own, from params)."""
    sd = opt.state_dict()
    state: dict[int, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith(prefix + "."):
            i, name = key[len(prefix) + 1 :].split(".", 1)
            state.setdefault(int(i), {})[name] = value
    opt.load_state_dict({"state": state, "param_groups": sd["param_groups"]})
