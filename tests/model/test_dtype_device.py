"""model.dtype and runtime.device: refused before any work when the machine cannot run them; a bfloat16
model edited end to end through the stages, checked against the float32 run of the same project.

No GPU is needed: the CUDA paths are checked for their refusals here (and run on a GPU machine by
bench/gpu_check.py when one is available).
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from scratch_project import method_project, run_stage_inprocess
from transformers import AutoModelForCausalLM

from ece.config import FtCfg, load_params
from ece.data.facts import Fact
from ece.editing.finetune import finetune_delta
from ece.errors import EceError
from ece.model.adapter import ModelAdapter
from ece.model.loading import load_model, resolve_device, save_model, tiny_model

NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
W_OUT = "model.layers.{}.mlp.down_proj.weight"


@NO_CUDA
@pytest.mark.parametrize("spec", ["cuda", "cuda:0", "cuda:3"])
def test_cuda_without_cuda_is_refused(spec: str) -> None:
    with pytest.raises(EceError, match="no CUDA device") as err:
        resolve_device(spec)
    assert "runtime.device: auto or cpu" in err.value.hint


@NO_CUDA
def test_auto_is_the_cpu_without_cuda() -> None:
    assert resolve_device("auto") == torch.device("cpu")
    model, _ = load_model("tiny-llama", device="auto")
    assert next(model.parameters()).device == torch.device("cpu")


@pytest.mark.parametrize(
    ("override", "message"),
    [("model.dtype=float8", "unknown model.dtype 'float8'"), ("runtime.device=gpu", "unknown runtime.device 'gpu'")],
)
def test_bad_dtype_or_device_is_refused_when_params_are_read(override: str, message: str) -> None:
    with pytest.raises(EceError, match=message):
        load_params("params.yaml", [override])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_load_model_in_a_dtype(dtype: torch.dtype) -> None:
    name = {torch.bfloat16: "bfloat16", torch.float16: "float16"}[dtype]
    model, _ = load_model("tiny-llama", dtype=name)
    assert {p.dtype for p in model.parameters()} == {dtype}
    assert not any(p.requires_grad for p in model.parameters())


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    return float(a @ b / (a.norm() * b.norm()))


def test_finetune_in_bfloat16_steps_a_float32_copy() -> None:
    """FT-L's steps (lr 5e-4, L∞ 5e-4) are below bfloat16's resolution of a weight (~1/128 relative): Adam on
    the bfloat16 weight itself would mostly round them away. The float32 copy keeps them: the bfloat16
    run's Δ points where the float32 run's does and respects the same bound."""
    facts = [Fact("0", "Rome", "{} is in", " Spain"), Fact("1", "Paris", "{} is the capital of", " Peru")]
    cfg = FtCfg(layer=1, lr=5e-4, steps=5, norm_constraint=5e-4)
    deltas = {}
    for dtype in ("float32", "bfloat16"):
        model, tok = load_model("tiny-llama", dtype=dtype)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        deltas[dtype] = finetune_delta(ModelAdapter(model), tok, facts, 1, cfg, target_only=False)
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items()), "the model must not change"
    assert deltas["bfloat16"].dtype == torch.float32
    assert float(deltas["bfloat16"].abs().max()) <= 5e-4 + 1e-7  # + float32 rounding of (W + Δ) − W
    assert float(deltas["bfloat16"].abs().max()) > 4e-4  # Adam's first steps move every entry by ~lr
    assert cosine(deltas["bfloat16"], deltas["float32"]) > 0.9


def test_a_bfloat16_model_edited_end_to_end(tmp_path_factory: pytest.TempPathFactory, monkeypatch) -> None:
    """ECE on tiny-llama in bfloat16 through covariance … apply_edits, evaluate: C0 is recomputed (another
    model fingerprint) and float64; every solve runs in float64; the edited folder is bfloat16; only the
    edited layers' W_out moved, and each layer's change points where the float32 run's does."""
    solved: list[torch.dtype] = []
    cholesky = torch.linalg.cholesky_ex

    def recording(a: torch.Tensor, *args, **kw):
        solved.append(a.dtype)
        return cholesky(a, *args, **kw)

    monkeypatch.setattr(torch.linalg, "cholesky_ex", recording)
    runs = {}
    for dtype in ("float32", "bfloat16"):
        work = method_project(tmp_path_factory, f"dtype_{dtype}", {"model.dtype": dtype})
        run_stage_inprocess(work, "apply_edits")
        runs[dtype] = work
    run_stage_inprocess(runs["bfloat16"], "evaluate")
    assert solved and set(solved) == {torch.float64}

    c0 = load_file(runs["bfloat16"] / "artifacts/covariance/c0.safetensors")
    assert c0 and {v.dtype for v in c0.values()} == {torch.float64}
    params = load_params(runs["bfloat16"] / "params.yaml")
    original32 = tiny_model(params.model.name, params.model.seed)[0].state_dict()
    edited = {
        dtype: AutoModelForCausalLM.from_pretrained(work / "artifacts/edited/model", dtype="auto").state_dict()
        for dtype, work in runs.items()
    }
    assert {v.dtype for v in edited["bfloat16"].values()} == {torch.bfloat16}
    edited_names = {W_OUT.format(l) for l in params.edit.layers}
    for name, value in edited["bfloat16"].items():
        start = original32[name].to(torch.bfloat16)
        if name not in edited_names:
            assert torch.equal(value, start), f"{name} changed"
            continue
        change16 = value.float() - start.float()
        change32 = edited["float32"][name] - original32[name]
        assert change16.abs().max() > 0, f"{name} did not change"
        assert cosine(change16, change32) > 0.9, name


def test_an_edited_layer_left_on_the_meta_device_is_refused() -> None:
    """accelerate offloads what does not fit to disk, leaving meta tensors in the model: such a W_out cannot be
    written in place, so the run stops before any work (Workbench.of and the covariance stage check it)."""
    model, _ = load_model("tiny-llama")
    adapter = ModelAdapter(model)
    module = adapter.w_out_module(1)
    module.weight = torch.nn.Parameter(torch.empty(module.weight.shape, device="meta"), requires_grad=False)
    adapter.check_layers([0, 2])  # the others are fine
    with pytest.raises(EceError, match=r"edit layers \[1\] were left on the meta device"):
        adapter.check_layers([0, 1])


def test_device_map_auto_loads_a_folder_where_accelerate_puts_it(tmp_path) -> None:
    """Without GPUs accelerate places everything on the CPU; the model is the folder's, frozen, in model.dtype."""
    model, tok = tiny_model("tiny-llama")
    save_model(model, tok, tmp_path / "m")
    mapped, _ = load_model(str(tmp_path / "m"), dtype="bfloat16", device_map="auto")
    assert {p.device.type for p in mapped.parameters()} == {"cpu"}
    assert {p.dtype for p in mapped.parameters()} == {torch.bfloat16}
    assert not any(p.requires_grad for p in mapped.parameters())
    for name, value in model.state_dict().items():
        assert torch.equal(mapped.state_dict()[name], value.to(torch.bfloat16)), name
