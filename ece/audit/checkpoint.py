"""The stored state of sequential editing: what apply_edits keeps after every finished batch, kept after
the run so that a later run with the same first batches starts where they end.

One folder per lineage (same method, params, model, covariance and code; `Checkpoint.folder`) holds:

- delta-batch-XXXX.safetensors: the columns batch XXXX changed, before and after (ece.audit.ledger format);
- rows-XXXX.json: the batch's ledger/layer/timing rows (without the columns every row shares);
- carry-XXXX.safetensors: what batch XXXX carries to the next ones (ece.editing.editor.Editor.carry):
  the keys each layer's solve used (methods with a cache P: P after batch b is rebuilt as the sum of
  Kᵀ K over batches 0..b, in batch order, so exactly as the run grew it) and UltraEdit's feature
  moments after the batch; absent when the method carries nothing;
- state.json: {"prefix_keys": [...]}, written LAST with an atomic rename: it is the commit point.
  prefix_keys[b] hashes everything batches 0..b depend on (their facts, z, selections, clusters) on top
  of the lineage, so it stays valid when only LATER batches change.

Resuming finds the longest run of batches whose prefix keys match the current ones: after a kill that
is every finished batch; after facts were appended, or a fact of a later batch changed or was removed,
it is every batch before the first changed one (incremental apply: appending 100 facts to a 2000-fact
run costs one batch). Every file is written to a temporary sibling and renamed into place, so a
process killed at any moment leaves either the previous or the new state, never a half-written file.
(Renames are not fsynced: this protects against a killed process, not against a power cut.)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import Tensor

from ece.audit.ledger import delta_name, read_delta, write_delta
from ece.data.io import atomic_path, write_json
from ece.editing.editor import LayerChange

STATE = "state.json"


class Checkpoint:
    def __init__(self, folder: str | Path, prefix_keys: list[str]) -> None:
        self.folder = Path(folder)
        self.prefix_keys = prefix_keys  # of the current run, one per batch
        self.committed: list[str] = []  # prefix keys of the batches stored in the folder

    def _rows_path(self, batch: int) -> Path:
        return self.folder / f"rows-{batch:04d}.json"

    def _carry_path(self, batch: int) -> Path:
        return self.folder / f"carry-{batch:04d}.safetensors"

    def delta_path(self, batch: int) -> Path:
        return self.folder / delta_name(batch)

    def resume(self) -> int:
        """Index of the last stored batch that this run would compute identically (-1: none)."""
        state_path = self.folder / STATE
        try:
            stored = [str(k) for k in json.loads(state_path.read_text())["prefix_keys"]] if state_path.exists() else []
        except (json.JSONDecodeError, KeyError, TypeError):
            print(f"checkpoint: {state_path} is unreadable; starting from the first batch")
            stored = []
        same = 0
        while same < min(len(stored), len(self.prefix_keys)) and stored[same] == self.prefix_keys[same]:
            same += 1
        missing = [p.name for b in range(same) for p in (self.delta_path(b), self._rows_path(b)) if not p.exists()]
        if missing:
            print(
                f"checkpoint: files missing from {self.folder} ({', '.join(missing[:3])}); starting from the first batch"
            )
            same = 0
        elif stored and not same:
            print(
                f"checkpoint: none of the {len(stored)} stored batches in {self.folder} match this run's inputs; "
                "starting from the first batch"
            )
        self.committed = stored[:same]
        if same < len(stored):  # later stored batches belong to other facts: no longer part of the state
            self._write_state()
        return same - 1

    def delta(self, batch: int) -> dict[int, LayerChange]:
        return read_delta(self.delta_path(batch))

    def rows(self, batch: int) -> dict[str, Any]:
        return json.loads(self._rows_path(batch).read_text())

    def carried(self, batch: int) -> dict[str, Tensor]:
        """What batch `batch` carried to the next ones (empty for methods that carry nothing)."""
        path = self._carry_path(batch)
        return load_file(str(path)) if path.exists() else {}

    def commit(
        self, batch: int, changes: dict[int, LayerChange], rows: dict[str, Any], carried: dict[str, Tensor]
    ) -> None:
        """Record a finished batch; only the final rename of state.json makes it count."""
        assert batch == len(self.committed), "batches are committed in order"
        self.folder.mkdir(parents=True, exist_ok=True)
        write_delta(self.delta_path(batch), changes)
        write_json(self._rows_path(batch), rows)
        self._carry_path(batch).unlink(missing_ok=True)
        if carried:
            with atomic_path(self._carry_path(batch)) as tmp:
                save_file({name: t.contiguous() for name, t in carried.items()}, str(tmp))
        self.committed = [*self.committed, self.prefix_keys[batch]]
        self._write_state()

    def _write_state(self) -> None:
        write_json(self.folder / STATE, {"prefix_keys": self.committed})
