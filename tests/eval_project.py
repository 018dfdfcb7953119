"""A tiny evaluate project (tiny-llama, 4 facts with generation prompts, 3 batches of random column
changes) for the tests of the evaluate stage: tests/eval/test_evaluate_metrics.py and the data-parallel
run in tests/pipeline/test_distributed.py."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import polars as pl
import torch
from safetensors.torch import save_file
from torch import nn
from transformers import PreTrainedTokenizerBase

from ece.data.loaders import SCHEMA
from ece.model.adapter import ModelAdapter
from ece.model.loading import save_model, tiny_model

ROOT = Path(__file__).resolve().parents[1]

# the evaluate stage on the tiny project: small enough for seconds, every part of the evaluation on
STAGE_OVERRIDES = [
    "model.name=tiny-llama",
    "edit.layers=[1,2]",
    "evaluate.n_general=2",
    "evaluate.general_tasks=[sst2]",
    "evaluate.ppl_tokens=64",
    "evaluate.ppl_window=32",
    "evaluate.gen_max_new_tokens=8",
]


def facts_table(n: int = 4) -> pl.DataFrame:
    rows = [
        (
            "Danielle Darrieux",
            "The mother tongue of {} is",
            "English",
            "French",
            "Michel Rocard is a native speaker of",
        ),
        ("Toko Yasuda", "{} plays the", "piano", "guitar", "John Lennon performs on the"),
        ("Paris", "{} is the capital of", "Italy", "France", "Lyon is a city in"),
        ("Apple A5", "{} was made by", "Google", "Apple", "The iPhone is made by"),
    ][:n]
    data = {c: [] for c in SCHEMA}
    for i, (s, prompt, new, true, neighbour) in enumerate(rows):
        row = {
            "id": f"t:{i}",
            "subject": s,
            "prompt": prompt,
            "target_new": new,
            "target_true": true,
            "paraphrase_prompts": [f"Everyone knows that {prompt.replace('{}', s)}"],
            "neighborhood_prompts": [neighbour],
            "neighborhood_target": true,
            "generation_prompts": [f"{s} is known for", f"{s} often"],
            "source": "test",
            "content_hash": f"h{i}",
        }
        for c in SCHEMA:
            data[c].append(row[c])
    return pl.DataFrame(data, schema=SCHEMA)


def build_eval_project(folder: Path) -> tuple[pl.DataFrame, nn.Module, PreTrainedTokenizerBase]:
    """artifacts/prepared + artifacts/edited in `folder`; returns the facts and the edited model."""
    df = facts_table()
    (folder / "artifacts" / "prepared").mkdir(parents=True)
    (folder / "artifacts" / "edited").mkdir(parents=True)
    (folder / "data").symlink_to(ROOT / "data")
    df.write_parquet(folder / "artifacts/prepared/edits.parquet")
    (folder / "artifacts/prepared/meta.json").write_text(
        json.dumps({"dataset_hash": "abc", "format": "test", "source": {"path": "none"}})
    )
    model, tok = tiny_model("tiny-llama", 0)
    adapter = ModelAdapter(model)
    g = torch.Generator().manual_seed(1)
    sizes = [2, 1, 1]
    for b in range(len(sizes)):
        out = {}
        for layer in (1, 2):
            cols = torch.randperm(64, generator=g)[:16].sort().values
            w = adapter.w_out_weight(layer)
            out[f"layer.{layer}.cols"], out[f"layer.{layer}.old"] = cols, w[:, cols].clone()
            with torch.no_grad():
                w[:, cols] += 3.0 * torch.randn((w.shape[0], len(cols)), generator=g)
            out[f"layer.{layer}.new"] = w[:, cols].clone()
        save_file(out, str(folder / f"artifacts/edited/delta-batch-{b:04d}.safetensors"))
    pl.DataFrame({"batch": [0, 1, 2], "n_facts": sizes}).write_parquet(folder / "artifacts/edited/batches.parquet")
    save_model(model, tok, folder / "artifacts/edited/model")
    return df, model, tok


def load_evaluate_stage() -> ModuleType:
    spec = importlib.util.spec_from_file_location("evaluate_stage", ROOT / "stages" / "evaluate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module
