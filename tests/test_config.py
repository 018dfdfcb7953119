"""params.yaml validation: every numeric param out of range, and every unknown choice, stops
`load_params` with an EceError that names the param; a model that is not on this machine fails at once."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import pytest

from ece.config import Params, load_params
from ece.errors import EceError
from ece.model.loading import load_model

ROOT = Path(__file__).resolve().parents[1]

# One out-of-range value per numeric param (the bound itself where the bound is excluded).
INVALID = {
    "model.seed": -1,
    "edit.batch_size": 0,
    "data.n_facts": -1,
    "data.max_chars": 0,
    "covariance.n_tokens": 0,
    "covariance.seq_len": 1,
    "covariance.batch_size": 0,
    "ece.neuron_threshold": 1.5,
    "cluster.k_max": 0,
    "cluster.seed": -1,
    "z.shared_steps": -1,
    "z.instance_steps": -1,
    "z.lr": 0.0,
    "z.kl_factor": -0.1,
    "z.weight_decay": -0.1,
    "z.clamp_norm_factor": 0.0,
    "z.n_context": 11,
    "z.context_length": 0,
    "z.stop_loss": -0.1,
    "z.stop_nll": -0.1,
    "z.facts_per_pass": -1,
    "z.window_batches": 0,
    "z.warm_scale": -0.5,
    "z.predict_cold": -1.0,
    "z.predict_ridge": 0.0,
    "z.predict_min_facts": 0,
    "update.mom2_update_weight": -1.0,
    "update.max_update_norm": 0.0,
    "alphaedit.nullspace_threshold": 0.0,
    "alphaedit.nullspace_energy": 1.0,
    "alphaedit.l2": 0.0,
    "rome.layer": -1,
    "rome.mom2_update_weight": 0.0,
    "ft.layer": -1,
    "ft.lr": 0.0,
    "ft.steps": 0,
    "ft.norm_constraint": 0.0,
    "ultraedit.lr": 0.0,
    "train_editor.heldout": 0,
    "train_editor.max_steps": 0,
    "train_editor.eval_every": 0,
    "train_editor.patience": -1,
    "train_editor.seed": -1,
    "mend.rank": 0,
    "mend.edit_lr": 0.0,
    "mend.lr": 0.0,
    "mend.lr_lr": -1.0,
    "mend.c_edit": 0.0,
    "mend.c_loc": -1.0,
    "mend.accumulate": 0,
    "mend.grad_clip": 0.0,
    "serac.embed_layer": -1,
    "serac.dim": 0,
    "serac.temperature": 0.0,
    "serac.lr": 0.0,
    "serac.batch_records": 1,
    "serac.general_texts": -1,
    "serac.general_negatives": -1,
    "serac.threshold": 1.0,
    "evaluate.batch_size": 0,
    "evaluate.n_general": -1,
    "evaluate.ppl_tokens": 0,
    "evaluate.ppl_window": 0,
    "evaluate.gen_per_fact": -1,
    "evaluate.gen_facts": -1,
    "evaluate.gen_max_new_tokens": 0,
    "evaluate.gen_batch_size": 0,
    "evaluate.gen_top_k": 0,
    "evaluate.seed": -1,
    "evaluate.threads": -1,
    "evaluate.curve_every": -1,
    "evaluate.reference_articles": 0,
}
MORE_INVALID = {  # further bounds of params already in INVALID, and lists of numbers
    "ece.neuron_threshold": 0.0,
    "serac.threshold": 0.0,
    "alphaedit.nullspace_energy": -0.1,
    "z.n_context": -1,
    "edit.layers": [-1, 2],
    "mend.layers": [0, 2],  # MEND reads the activations below its first layer
    "ultraedit.layers": [21, 20],
    "train_editor.id_range": [5, 1],
    "serac.general_words": [9, 8],
}
UNKNOWN_CHOICES = {
    "method": "magic",
    "ece.scorer": "gradient",
    "ece.aggregation": "mean",
    "data.format": "xml",
    "z.lr_scale": "cosine",
    "z.warm_start": "random",
    "z.warm_from_earlier": "sometimes",
    "train_editor.format": "xml",
    "model.dtype": "float8",
    "z.dtype": "int8",
    "model.device_map": "balanced",
}


def numeric_params() -> list[str]:
    """Every int or float param of the schema, found from the dataclasses themselves."""
    return [
        f"{section.name}.{f.name}"
        for section in dataclasses.fields(Params)
        if dataclasses.is_dataclass(section.default_factory)
        for f in dataclasses.fields(section.default_factory)
        if f.type in ("int", "float")
    ]


def expect_error(overrides: list[str], name: str) -> EceError:
    with pytest.raises(EceError) as info:
        load_params(ROOT / "params.yaml", overrides)
    assert name in str(info.value), str(info.value)
    assert info.value.hint
    return info.value


def test_every_numeric_param_has_an_invalid_value_here() -> None:
    """A new numeric param needs a range check in ece.config.validate and a row in INVALID."""
    assert sorted(numeric_params()) == sorted(INVALID)


def test_the_shipped_params_are_valid() -> None:
    load_params(ROOT / "params.yaml")


@pytest.mark.parametrize(("name", "value"), [*INVALID.items(), *MORE_INVALID.items()])
def test_numeric_param_out_of_range(name: str, value: object) -> None:
    error = expect_error([f"{name}={value}"], name)
    assert str(value).replace(" ", "") in str(error).replace(" ", "")  # says what it got


@pytest.mark.parametrize(("name", "value"), UNKNOWN_CHOICES.items())
def test_unknown_choice(name: str, value: str) -> None:
    error = expect_error([f"{name}={value}"], f"unknown {name} '{value}'")
    assert "use one of" in (error.hint or "")


def test_unknown_hub_model_fails_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without HF_HUB_OFFLINE the lookup must still stay local: no network retries with back-off."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    name = "no-such-org-xyz/no-such-model-xyz"
    start = time.perf_counter()
    with pytest.raises(EceError) as info:
        load_model(name)
    assert time.perf_counter() - start < 5
    assert f"cannot load model '{name}' offline" in str(info.value)
    assert "local Hugging Face folder" in (info.value.hint or "")


def test_max_context_is_the_number_of_starter_words() -> None:
    from ece.config import MAX_CONTEXT
    from ece.model.prompts import STARTERS

    assert len(STARTERS) == MAX_CONTEXT


def test_mend_checkpoints_only_after_an_optimiser_step() -> None:
    """A checkpoint in the middle of an accumulation would lose the accumulated gradients on resume."""
    expect_error(["method=mend", "train_editor.eval_every=15"], "must be a multiple of mend.accumulate (10)")
