"""Crash-safe sequential editing: what apply_edits keeps after every finished batch.

The folder holds, for the run identified by `key` (a hash of everything the run depends on):

- delta-batch-XXXX.safetensors: the columns batch XXXX changed, before and after (ece.audit.ledger format);
- rows-XXXX.json: the batch's ledger/timing rows;
- cache-XXXX.safetensors: the reference-knowledge cache P of every edited layer after batch XXXX
  (only the newest is kept; absent for methods without a cache);
- state.json: {"key", "last_batch", "cache"}, written LAST with an atomic rename: it is the commit
  point. A batch whose state.json was not written is not finished; its leftovers are overwritten.

Every file is written to a temporary sibling and renamed into place, so a process killed at any
moment leaves either the previous or the new state, never a half-written file. (Renames are not
fsynced: this protects against a killed process, not against a power cut.) A state with another key
(other inputs, params or code) is stale: it is ignored and the folder is emptied.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import Tensor

from ece.audit.ledger import delta_name, read_delta, write_delta
from ece.data.io import atomic_path, write_json
from ece.editing.editor import LayerChange

STATE = "state.json"


class Checkpoint:
    def __init__(self, folder: str | Path, key: str) -> None:
        self.folder = Path(folder)
        self.key = key
        self._cache_file: str | None = None

    def _rows_path(self, batch: int) -> Path:
        return self.folder / f"rows-{batch:04d}.json"

    def delta_path(self, batch: int) -> Path:
        return self.folder / delta_name(batch)

    def resume(self) -> int:
        """Index of the last finished batch of this run (-1: start from scratch, folder emptied)."""
        state_path = self.folder / STATE
        if not state_path.exists():
            self.clear()
            return -1
        try:
            state = json.loads(state_path.read_text())
            last = int(state["last_batch"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            print(f"checkpoint: {state_path} is unreadable; starting from the first batch")
            self.clear()
            return -1
        if state.get("key") != self.key:
            print(f"checkpoint: ignoring a stale checkpoint in {self.folder} (made from other inputs, params or code)")
            self.clear()
            return -1
        needed = [self.delta_path(b) for b in range(last + 1)] + [self._rows_path(b) for b in range(last + 1)]
        if state.get("cache"):
            needed.append(self.folder / state["cache"])
        missing = [p.name for p in needed if not p.exists()]
        if missing:
            print(
                f"checkpoint: files missing from {self.folder} ({', '.join(missing[:3])}); starting from the first batch"
            )
            self.clear()
            return -1
        self._cache_file = state.get("cache")
        return last

    def delta(self, batch: int) -> dict[int, LayerChange]:
        return read_delta(self.delta_path(batch))

    def rows(self, batch: int) -> dict[str, Any]:
        return json.loads(self._rows_path(batch).read_text())

    def cache(self) -> dict[int, Tensor]:
        """P per layer as committed with the last finished batch (empty when none was stored)."""
        if not self._cache_file:
            return {}
        tensors = load_file(str(self.folder / self._cache_file))
        return {int(name.split(".")[1]): t for name, t in tensors.items()}

    def commit(
        self, batch: int, changes: dict[int, LayerChange], rows: dict[str, Any], cache: dict[int, Tensor] | None
    ) -> None:
        """Record a finished batch; only the final rename of state.json makes it count."""
        self.folder.mkdir(parents=True, exist_ok=True)
        write_delta(self.delta_path(batch), changes)
        write_json(self._rows_path(batch), rows)
        cache_file = None
        if cache:
            cache_file = f"cache-{batch:04d}.safetensors"
            with atomic_path(self.folder / cache_file) as tmp:
                save_file(
                    {f"layer.{l}": t.contiguous() for l, t in cache.items()}, str(tmp), metadata={"key": self.key}
                )
        write_json(self.folder / STATE, {"key": self.key, "last_batch": batch, "cache": cache_file})
        for old in self.folder.glob("cache-*.safetensors"):
            if old.name != cache_file:
                old.unlink()
        self._cache_file = cache_file

    def clear(self) -> None:
        if self.folder.exists():
            shutil.rmtree(self.folder)
