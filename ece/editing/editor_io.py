"""A trained editor on disk, checked before use, the resumable state of its training, and the training
bookkeeping every trained editor shares (TrainingRun: seeded record order, curve, best editor, patience,
checkpoint), so that a method's `train` holds only its data, loss and optimiser step.

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
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import polars as pl
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from ece.config import TrainEditorCfg
from ece.data.facts import Fact
from ece.data.io import atomic_dir, sha256_json, write_json
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


class TrainingRun:
    """The bookkeeping every trained editor's training shares, around the method's own data, loss and
    optimiser step: the steps left (resumed from `checkpoint`), each step's records in a seeded order
    (every record once per epoch, the same order on a resume), and after each evaluation the curve
    point, the best editor so far, the patience count, the log line and the checkpoint."""

    def __init__(
        self,
        t: TrainEditorCfg,
        editor: nn.Module,
        name: str,
        optimizers: dict[str, torch.optim.Optimizer],
        checkpoint: TrainingCheckpoint,
        log: Callable[[str], None],
    ) -> None:
        self.t, self.editor, self.name, self.optimizers = t, editor, name, optimizers
        self.checkpoint, self.log = checkpoint, log
        self.state: dict[str, Any] = {
            "step": 0,
            "curve": [],
            "best_loss": None,
            "best_step": 0,
            "since_best": 0,
            "seconds": 0.0,
        }
        self.best = {k: v.clone() for k, v in editor.state_dict().items()}
        restored = checkpoint.load()
        if restored is not None:
            tensors, self.state = restored
            editor.load_state_dict({k[len(name) + 1 :]: v for k, v in tensors.items() if k.startswith(name + ".")})
            self.best = {k[5:]: v for k, v in tensors.items() if k.startswith("best.")}
            for prefix, opt in optimizers.items():
                load_optimizer(opt, tensors, prefix)
            log(f"train_editor: resuming from the checkpoint at step {self.state['step']}")
        self._orders: dict[int, list[int]] = {}
        self._clock = time.perf_counter() - self.state["seconds"]

    def steps(self) -> range:
        """The steps still to train: none once a run stopped early."""
        return range(self.state["step"], self.state["step"] if self.state.get("stopped") else self.t.max_steps)

    def batch(self, step: int, n: int, size: int) -> list[int]:
        """The indices of the records (of `n`) step `step` trains on: `size` consecutive ones of its
        epoch's permutation, seeded by (seed, epoch) alone so a resumed run draws the same."""
        epoch, i = divmod(step, -(-n // size))
        if epoch not in self._orders:
            seed = int(sha256_json([self.t.seed, epoch])[:15], 16)
            self._orders[epoch] = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
        return self._orders[epoch][i * size : (i + 1) * size]

    def due(self, done: int) -> bool:
        """Whether the run evaluates after `done` steps: every `eval_every` and at the last step."""
        return done % self.t.eval_every == 0 or done == self.t.max_steps

    def evaluated(self, done: int, point: dict[str, float], note: str = "", save: bool = True) -> bool:
        """Record the evaluation `point` (its `train_loss` and `heldout_loss` and the method's own fields)
        after `done` steps, keep the editor when its held-out loss is the lowest yet, log, and (when
        `save`: nothing half-accumulated would be lost) write the checkpoint. True when the run stops."""
        state = self.state
        state["seconds"] = time.perf_counter() - self._clock
        state["curve"].append({"step": done, **point, "seconds": round(state["seconds"], 1)})
        if state["best_loss"] is None or point["heldout_loss"] < state["best_loss"]:
            state.update(best_loss=point["heldout_loss"], best_step=done, since_best=0)
            self.best = {k: v.clone() for k, v in self.editor.state_dict().items()}
        else:
            state["since_best"] += 1
        state["step"] = done
        state["stopped"] = bool(self.t.patience and state["since_best"] >= self.t.patience)
        self.log(
            f"train_editor: step {done}, train {point['train_loss']:.4f}, held-out {point['heldout_loss']:.4f}{note}"
        )
        if save:
            tensors = {
                **{f"{self.name}.{k}": v for k, v in self.editor.state_dict().items()},
                **{f"best.{k}": v for k, v in self.best.items()},
            }
            for prefix, opt in self.optimizers.items():
                tensors |= optimizer_tensors(opt, prefix)
            self.checkpoint.save(tensors, state)
        if state["stopped"]:
            self.log(f"train_editor: no lower held-out loss in {self.t.patience} evaluations; stopping at step {done}")
        return state["stopped"]

    def summary(self) -> dict[str, Any]:
        """Where training ended, for the editor's config."""
        return {
            "steps": self.state["step"],
            "best_step": self.state["best_step"],
            "heldout_loss": self.state["best_loss"],
            "stopped_early": bool(self.state.get("stopped")),
        }


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
