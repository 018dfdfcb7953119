"""The shipped model configs (configs/*.yaml): each is what DVC and load_params read, every value has its
source comment, its edited layers exist in the real model, and the Llama and Qwen2 ones edit a local HF folder
end to end (a tiny random model of the family with the real model's layer indices, not its width)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from dvc.utils.hydra import apply_overrides
from safetensors.torch import load_file
from scratch_project import method_project, run_stage_inprocess

from ece.config import load_params
from ece.model.loading import save_model, tiny_model

ROOT = Path(__file__).resolve().parents[1]
# Blocks of the real architectures, from their Hugging Face config.json: Meta-Llama-3-8B
# "num_hidden_layers": 32, EleutherAI/gpt-j-6b "n_layer": 28, Qwen/Qwen2.5-7B "num_hidden_layers": 28.
BLOCKS = {"llama3-8b.yaml": 32, "gpt-j-6b.yaml": 28, "qwen2.5-7b.yaml": 28}
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def _args(*argv: str) -> subprocess.CompletedProcess:
    """`python bench/experiments.py args …`, as a user runs it inside `$(…)`."""
    return subprocess.run(
        [sys.executable, str(ROOT / "bench/experiments.py"), "args", *argv],
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
    )


def _value(params: object, dotted: str) -> object:
    for key in dotted.split("."):
        params = getattr(params, key)
    return params


def test_every_config_knows_its_architecture() -> None:
    assert sorted(c.name for c in CONFIGS) == sorted(BLOCKS)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.name)
def test_config_reaches_params_through_dvc(config: Path, tmp_path: Path) -> None:
    """`python bench/experiments.py args` → DVC's own `-S` parser writes params.yaml → load_params reads
    every value the file holds, as YAML reads it."""
    printed = _args(str(config), "model.name=/models/x")
    assert printed.returncode == 0, printed.stderr
    words = printed.stdout.split()
    assert words[::2] == ["-S"] * (len(words) // 2)
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    apply_overrides(str(tmp_path / "params.yaml"), words[1::2])
    params = load_params(tmp_path / "params.yaml")
    expected = {**yaml.safe_load(config.read_text()), "model.name": "/models/x"}
    assert {key: _value(params, key) for key in expected} == expected
    assert max(params.edit.layers) < BLOCKS[config.name]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.name)
def test_every_value_names_its_source(config: Path) -> None:
    settings = [line for line in config.read_text().splitlines() if line and not line.startswith((" ", "#"))]
    assert settings and all("#" in line for line in settings), [s for s in settings if "#" not in s]


def test_args_refuses_a_config_that_is_not_a_mapping_of_dotted_keys(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text("edit:\n  layers: [1]\n")
    printed = _args(str(tmp_path / "c.yaml"))
    assert printed.returncode != 0 and "dotted param names" in printed.stderr and not printed.stdout


def test_args_refuses_an_unknown_key_before_dvc_sees_it() -> None:
    printed = _args(str(CONFIGS[0]), "z.steps=3")
    assert printed.returncode != 0 and "z.steps" in printed.stderr and not printed.stdout


def test_args_extra_overrides_win_and_whitespace_is_refused() -> None:
    printed = _args(str(CONFIGS[0]), "z.lr=0.3", "method=memit")
    words = printed.stdout.split()
    assert words.count("-S") == len(yaml.safe_load(CONFIGS[0].read_text())) + 1  # z.lr replaced, method added
    assert "z.lr=0.3" in words and "method=memit" in words
    spaced = _args(str(CONFIGS[0]), "model.name=/my models/x")
    assert spaced.returncode != 0 and "whitespace" in spaced.stderr and not spaced.stdout


@pytest.mark.parametrize("config, kind", [("llama3-8b.yaml", "tiny-llama"), ("qwen2.5-7b.yaml", "tiny-qwen2")])
def test_config_edits_a_local_folder_of_its_family(
    config: str, kind: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Every value of the config (bfloat16, device_map auto, layers 4-8, λ 15000, z as the references) on
    a 10-block random model of its family saved as an HF folder: apply_edits writes a bfloat16 folder in
    which exactly W_out (mlp.down_proj) of blocks 4-8 moved (Qwen2's q/k/v biases included in "the rest")."""
    folder = tmp_path_factory.mktemp(kind) / "model"
    model, tok = tiny_model(kind, seed=0, n_layers=10)
    save_model(model, tok, folder)
    values = {**yaml.safe_load((ROOT / "configs" / config).read_text()), "model.name": str(folder)}
    work = method_project(tmp_path_factory, f"{kind}_config", values)
    run_stage_inprocess(work, "apply_edits")
    original = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    edited = load_file(work / "artifacts/edited/model/model.safetensors")
    assert {v.dtype for v in edited.values()} == {torch.bfloat16}
    moved = {name for name, value in edited.items() if not torch.equal(value, original[name])}
    assert moved == {f"model.layers.{l}.mlp.down_proj.weight" for l in (4, 5, 6, 7, 8)}
