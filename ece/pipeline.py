"""What the stage scripts share: artifact paths, reading the prepared facts, and the loaded model.

Paths are relative to the project root (where dvc.yaml lives), and every one of them is declared as a
dependency or output in dvc.yaml.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import polars as pl
from safetensors import safe_open
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from ece.adapter import ModelAdapter
from ece.config import Params
from ece.errors import EceError
from ece.keys import Fact, context_templates
from ece.models import load_model, model_fingerprint

PREPARED = Path("artifacts/prepared/edits.parquet")
COVARIANCE = Path("artifacts/covariance/c0.safetensors")
ATTRIBUTION = Path("artifacts/attribution")
CLUSTERS = Path("artifacts/clusters")
Z_DIR = Path("artifacts/z")
EDITED = Path("artifacts/edited")
# Seconds per batch of each stage: facts of one run, not of its result. They live outside the cached
# outputs (uncached DVC outputs under reports/), so an identical recompute gives identical hashes.
ATTRIBUTION_TIMINGS = Path("reports/attribution_timings.json")
CLUSTER_TIMINGS = Path("reports/cluster_timings.json")
Z_TIMINGS = Path("reports/z_timings.json")


def read_facts(path: Path = PREPARED) -> tuple[pl.DataFrame, list[Fact]]:
    if not path.exists():
        raise EceError(f"{path} not found", "run the prepare stage first: dvc repro prepare")
    df = pl.read_parquet(path)
    return df, [Fact.from_row(r) for r in df.iter_rows(named=True)]


def batch_ranges(n: int, batch_size: int) -> list[range]:
    """Sequential batches in dataset order; the last one may be short."""
    return [range(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]


@dataclass
class Workbench:
    """The loaded model with everything derived from it that several stages need."""

    model: nn.Module
    tok: PreTrainedTokenizerBase
    adapter: ModelAdapter
    templates: list[str]
    fingerprint: str

    @classmethod
    def open(cls, p: Params) -> "Workbench":
        model, tok = load_model(p.model.name, p.model.seed)
        adapter = ModelAdapter(model)
        adapter.check_layers(p.edit.layers)
        templates = context_templates(model, tok, p.z.n_context, p.z.context_length)
        return cls(model, tok, adapter, templates, model_fingerprint(model))


def read_timings(path: Path) -> dict[int, float]:
    """Per-batch seconds recorded by a stage (batch index → seconds)."""
    return {int(k): float(v) for k, v in json.loads(path.read_text()).items()} if path.exists() else {}


def read_z(batch: int) -> tuple[Tensor, Tensor]:
    """z and h (n, d) of one batch, in the batch's fact order, from the precompute_z cache."""
    index = pl.read_parquet(Z_DIR / "index.parquet").filter(pl.col("batch") == batch)
    if index.is_empty():
        raise EceError(f"no z for batch {batch}", "rerun the precompute_z stage: dvc repro precompute_z")
    with safe_open(str(Z_DIR / "cache" / index["file"][0]), framework="pt") as f:
        return f.get_tensor("z"), f.get_tensor("h")
