"""The one place that knows model architectures.

Everything else asks the adapter for "the W_out of layer l as a d × f matrix", "the residual stream
after block l" or "run the blocks above l from this hidden state", never for module names.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from copy import deepcopy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import DynamicCache

from ece.errors import EceError


@dataclass(frozen=True)
class ArchSpec:
    blocks: str  # dotted path of the ModuleList of transformer blocks
    w_out: str  # path of the MLP output projection inside one block
    conv1d: bool  # GPT-2's Conv1D stores the weight as (in, out): transpose to get d × f
    position_embedding: str | None  # absolute position embedding added to inputs_embeds, if any
    post_mlp_norm: str | None = None  # RMS norm between W_out's output and the residual stream, if any
    layer_types_by_position: bool = False  # the base model gives its i-th block config.layer_types[i]


_LLAMA = ArchSpec("model.layers", "mlp.down_proj", False, None)
ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    # Gemma-3: W_out = down_proj (its input, the key, is gelu(gate) * up of the pre-feedforward-normed
    # stream); its output is RMS-normed (post_feedforward_layernorm) before the residual add. The
    # embedding is scaled by √d inside embed_tokens, so the residual stream a block returns is the
    # stream the next block reads, and feeding it back as inputs_embeds is not scaled again.
    "gemma3_text": ArchSpec("model.layers", "mlp.down_proj", False, None, "post_feedforward_layernorm", True),
    "gpt2": ArchSpec("transformer.h", "mlp.c_proj", True, "transformer.wpe"),
    "gptj": ArchSpec("transformer.h", "mlp.fc_out", False, None),
    "gpt_neox": ArchSpec("gpt_neox.layers", "mlp.dense_4h_to_h", False, None),
}


KV = dict[int, tuple[Tensor, Tensor]]  # block index -> (keys, values), (batch, kv heads, tokens, head dim)


class _FrozenPrefix(DynamicCache):
    """A cache that prepends fixed keys/values at every block and never grows, so one prefix serves
    every optimisation step (DynamicCache would append each step's tokens to it). With `keep`, it
    also keeps each block's prefix + new keys/values (`kept`): the keys and values of the whole
    sequence, computed for the new tokens only."""

    def __init__(self, kv: KV, keep: bool = False) -> None:
        super().__init__()
        self.kv = kv
        self.keep = keep
        self.kept: KV = {}

    def update(
        self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args, **kwargs
    ) -> tuple[Tensor, Tensor]:
        keys, values = self.kv[layer_idx]
        both = torch.cat([keys, key_states], dim=-2), torch.cat([values, value_states], dim=-2)
        if self.keep:
            self.kept[layer_idx] = both
        return both


class StopForward(Exception):
    """Raised by a hook to skip the blocks above the last one a computation needs."""


def _block_output(output: object) -> Tensor:
    return output[0] if isinstance(output, tuple) else output  # type: ignore[index,return-value]


class ModelAdapter:
    """Architecture-neutral access to a causal LM's blocks and MLP output projections."""

    def __init__(self, model: nn.Module) -> None:
        model_type = getattr(model.config, "model_type", None)
        if model_type not in ARCHITECTURES:
            raise EceError(
                f"unsupported architecture '{model_type}'",
                f"supported model types: {', '.join(sorted(ARCHITECTURES))}",
            )
        self.model = model
        self.spec = ARCHITECTURES[model_type]
        blocks = model.get_submodule(self.spec.blocks)
        assert isinstance(blocks, nn.ModuleList)
        self.blocks = blocks
        self.n_layers = len(blocks)
        w = self.w_out_weight(0)
        self.hidden_size, self.inner_size = int(w.shape[0]), int(w.shape[1])

    @property
    def device(self) -> torch.device:
        """Where the model's inputs go (its embedding's device; with a device map, layers may live elsewhere)."""
        return self.model.get_input_embeddings().weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The model's compute dtype; hidden states fed back into it (z's δ) are cast to it."""
        return self.w_out_weight(0).dtype

    def layer_device(self, layer: int) -> torch.device:
        """Where W_out of `layer` lives: its update is solved there."""
        return self.w_out_weight(layer).device

    def check_layers(self, layers: list[int]) -> None:
        bad = [l for l in layers if not 0 <= l < self.n_layers]
        if bad:
            raise EceError(
                f"edit layers {bad} are out of range: the model has {self.n_layers} layers (0..{self.n_layers - 1})",
                "set edit.layers in params.yaml to layers that exist",
            )
        offloaded = [l for l in layers if self.layer_device(l).type == "meta"]
        if offloaded:
            raise EceError(
                f"edit layers {offloaded} were left on the meta device by model.device_map (offloaded to disk): "
                "their weights cannot be edited in place",
                "give the model more GPU/CPU memory (accelerate's max_memory) or set model.device_map: none",
            )

    def cast(self, dtype: torch.dtype) -> ModelAdapter:
        """An adapter over a copy of the model in `dtype`, for passes that may run at a lower precision
        than the weights are kept in (z's descent: `z.dtype`); the model itself is not touched.

        On the CPU the copy uses eager attention: PyTorch's fused CPU attention is slow in bfloat16
        backward (60 % of a z pass on SmolLM2, against 7 % in float32), eager's is a few small matmuls.
        """
        if getattr(self.model, "hf_device_map", None):
            raise EceError(
                "a model spread by model.device_map cannot be copied into another dtype for z",
                "set z.dtype: model (and model.dtype to the precision wanted), or model.device_map: none",
            )
        copy = deepcopy(self.model).to(dtype)
        if self.device.type == "cpu":
            copy.set_attn_implementation("eager")
        return ModelAdapter(copy)

    def w_out_module(self, layer: int) -> nn.Module:
        return self.blocks[layer].get_submodule(self.spec.w_out)

    def w_out_name(self, layer: int) -> str:
        return f"{self.spec.blocks}.{layer}.{self.spec.w_out}.weight"

    def w_out_weight(self, layer: int) -> Tensor:
        """The weight as d × f (out × in); a view, so in-place edits change the model."""
        weight = self.w_out_module(layer).weight
        return weight.T if self.spec.conv1d else weight

    @torch.no_grad()
    def trace(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        key_layers: list[int] = (),  # type: ignore[assignment]
        out_layers: list[int] = (),  # type: ignore[assignment]
    ) -> tuple[dict[int, Tensor], dict[int, Tensor]]:
        """Run the model up to the highest layer asked for; return W_out inputs and block outputs.

        Both are (batch, seq, dim) per layer, float32 whatever the model's dtype (keys and residuals
        feed float64 solves), on the device of their layer. The blocks above are skipped, which is what
        makes covariance statistics and key computation cheap for early edited layers.
        """
        ids, mask = input_ids.to(self.device), attention_mask.to(self.device)
        return self._traced(
            lambda: self.model(input_ids=ids, attention_mask=mask, use_cache=False), key_layers, out_layers
        )

    def trace_from(
        self,
        start: int,
        hidden: Tensor,
        attention_mask: Tensor,
        key_layers: list[int] = (),  # type: ignore[assignment]
        out_layers: list[int] = (),  # type: ignore[assignment]
    ) -> tuple[dict[int, Tensor], dict[int, Tensor]]:
        """`trace` from the residual stream entering block `start` (the output of block start − 1, as
        `trace` returns it) instead of from the tokens: the blocks below `start` are not run again. Equal
        to `trace` on the same rows up to float rounding, as long as those blocks have not changed."""
        assert start >= 1 and all(l >= start for l in [*key_layers, *out_layers]), "layers below start are not run"
        return self._traced(
            lambda: self._run_above(start - 1, hidden, attention_mask, None, None), key_layers, out_layers
        )

    def _traced(
        self, forward: Callable[[], object], key_layers: list[int], out_layers: list[int]
    ) -> tuple[dict[int, Tensor], dict[int, Tensor]]:
        """Run `forward` with hooks that record W_out inputs at `key_layers` and block outputs at
        `out_layers`, stopping as soon as the highest of them is recorded: at the W_out input when that
        layer's block output is not asked for (the covariance stage's case), so its W_out, the rest of its
        block and every block above are never run."""
        keys: dict[int, Tensor] = {}
        outs: dict[int, Tensor] = {}
        last = max([*key_layers, *out_layers])

        def on_key(_m: nn.Module, inp: tuple[Tensor, ...], l: int) -> None:
            keys[l] = inp[0].detach().float()
            if l == last and l not in out_layers:
                raise StopForward

        def on_block(_m: nn.Module, _i: object, out: object, l: int) -> None:
            outs[l] = _block_output(out).detach().float()
            if l == last:
                raise StopForward

        handles = [
            self.w_out_module(l).register_forward_pre_hook(lambda m, i, l=l: on_key(m, i, l)) for l in key_layers
        ]
        for l in out_layers:
            handles.append(self.blocks[l].register_forward_hook(lambda m, i, o, l=l: on_block(m, i, o, l)))
        try:
            forward()
        except StopForward:
            pass
        finally:
            for h in handles:
                h.remove()
        return keys, outs

    def trace_grads(
        self, input_ids: Tensor, attention_mask: Tensor, layers: list[int], loss_fn: Callable[[Tensor], Tensor]
    ) -> tuple[dict[int, Tensor], dict[int, Tensor]]:
        """W_out inputs and the gradient of `loss_fn(logits)` with respect to W_out's outputs, both
        (batch, seq, dim) per layer in float32 on the layer's device, from one forward and one backward
        pass (UltraEdit's features); `loss_fn` gets float32 logits on the model's device.

        The weights stay frozen: each W_out output gets a zero tensor added that requires a gradient,
        so the gradient at it is the gradient at the output, through every path (cutting the graph at
        a leaf instead would drop the paths from one edited layer through the MLPs of the next).
        """
        keys: dict[int, Tensor] = {}
        probes: dict[int, Tensor] = {}

        def hook(_m: nn.Module, inp: tuple[Tensor, ...], out: Tensor, l: int) -> Tensor:
            keys[l] = inp[0].detach().float()
            probes[l] = torch.zeros_like(out, requires_grad=True)
            return out + probes[l]

        handles = [self.w_out_module(l).register_forward_hook(lambda m, i, o, l=l: hook(m, i, o, l)) for l in layers]
        try:
            with torch.enable_grad():
                logits = self.model(
                    input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device), use_cache=False
                ).logits
                grads = torch.autograd.grad(loss_fn(logits.float()), [probes[l] for l in layers])
        finally:
            for h in handles:
                h.remove()
        return keys, {l: g.float() for l, g in zip(layers, grads)}

    @contextmanager
    def w_out_added(self, deltas: dict[int, Tensor]) -> Iterator[dict[int, tuple[Tensor, Tensor]]]:
        """Within the context W_out of each layer in `deltas` computes (W + Δ)·x, differentiable in Δ
        (d × f, as `w_out_weight`): its output gains x·Δᵀ, the weights stay untouched.

        Yields, per layer, the last forward's W_out input x (…, f) and the added term (…, d). A loss's
        gradient with respect to the added term is its gradient with respect to the layer's output:
        with a zero Δ that requires grad, x and that gradient are the per-token factors of the loss's
        gradient of W_out (MEND's u and δ), read without forming the d × f gradient itself.
        """
        taps: dict[int, tuple[Tensor, Tensor]] = {}

        def add(layer: int, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor:
            added = F.linear(inputs[0], deltas[layer])
            taps[layer] = (inputs[0], added)
            return output + added

        handles = [self.w_out_module(l).register_forward_hook(lambda _m, i, o, l=l: add(l, i, o)) for l in deltas]
        try:
            yield taps
        finally:
            for h in handles:
                h.remove()

    @torch.no_grad()
    def w_out_target(self, layer: int, keys: Tensor, residuals: Tensor) -> Tensor:
        """The change of W_out's output at `keys` (n, f) that moves the residual stream by `residuals` (n, d).

        The solves fit ΔW k = r, which moves the stream by r where W_out's output is added to it as it
        is: then this is `residuals` itself. Gemma-3 RMS-normalises that output first, y = g ⊙ m / ρ(m)
        with ρ(m) = √(mean(m²) + ε), so ΔW k = r would move the stream by ≈ g ⊙ r / ρ(m) (|g| from 0 to
        1,660 on Gemma-3-270M). The target here is t = ρ(m) · r / g, with m = W_out k: the norm of m + t
        is (y + r) · ρ(m) / ρ(m + t), the direction of y + r exactly; its length the norm fixes (no write
        to W_out can change it), and the next layer's solve sees what is left. A few coordinates have
        gains near or at 0 (the layer barely writes there): 1/g is damped to g / (g² + γ²), γ = 1% of
        the median |g|, so they get ~0 instead of a huge t whose size, through ρ, would shrink every
        other coordinate of the output.
        """
        if self.spec.post_mlp_norm is None:
            return residuals
        norm = self.blocks[layer].get_submodule(self.spec.post_mlp_norm)
        eps = float(norm.eps)
        weight = self.w_out_weight(layer)
        # the gain whatever the norm's parametrisation (Gemma: 1 + w): the norm of a vector of ones is g/√(1 + ε)
        gain = (
            norm(torch.ones(1, weight.shape[0], dtype=weight.dtype, device=weight.device)).double()[0]
            * (1 + eps) ** 0.5
        )
        gamma = 0.01 * gain.abs().median()
        m = keys.double() @ weight.double().T
        rho = (m.pow(2).mean(-1, keepdim=True) + eps).sqrt()
        return residuals.double() * rho * gain / (gain.pow(2) + gamma.pow(2))

    @contextmanager
    def _blocks_above(self, layer: int) -> Iterator[None]:
        parent_path, _, attr = self.spec.blocks.rpartition(".")
        parent = self.model.get_submodule(parent_path)
        config = self.model.config
        types = getattr(config, "layer_types", None)
        setattr(parent, attr, nn.ModuleList(list(self.blocks)[layer + 1 :]))
        if self.spec.layer_types_by_position:  # else block l+1 would get block 0's rope base and mask
            config.layer_types = types[layer + 1 :]
        try:
            yield
        finally:
            setattr(parent, attr, self.blocks)
            if self.spec.layer_types_by_position:
                config.layer_types = types

    def _run_above(
        self,
        layer: int,
        hidden: Tensor,
        attention_mask: Tensor,
        position_ids: Tensor | None,
        cache: DynamicCache | None,
    ) -> Tensor:
        hidden = hidden.to(device=self.device, dtype=self.dtype)  # differentiable: z's δ is float32
        if position_ids is None:
            position_ids = torch.arange(hidden.shape[1], device=hidden.device).expand(hidden.shape[0], -1)
        position_ids = position_ids.to(self.device)
        attention_mask = attention_mask.to(self.device)
        if attention_mask.is_floating_point():  # additive masks must match the attention's dtype
            attention_mask = attention_mask.clamp(min=torch.finfo(self.dtype).min).to(self.dtype)
        window = getattr(self.model.config, "sliding_window", None)
        if isinstance(cache, _FrozenPrefix) and window is not None and attention_mask.shape[-1] > window:
            raise EceError(  # the caller's 4-D mask reaches local and global layers alike
                f"a frozen-prefix forward of {attention_mask.shape[-1]} tokens is longer than the model's "
                f"sliding window ({window})",
                "a prompt with its context prefix and target must fit in the window: shorten z.context_length",
            )
        embeds = hidden
        if self.spec.position_embedding is not None:  # the model adds it back to inputs_embeds
            embeds = hidden - self.model.get_submodule(self.spec.position_embedding)(position_ids)
        with self._blocks_above(layer):
            return self.model.base_model(
                inputs_embeds=embeds,
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=cache,
                use_cache=cache is not None and not isinstance(cache, _FrozenPrefix),
            ).last_hidden_state

    @torch.no_grad()
    def prefix_kv(
        self,
        layer: int,
        hidden: Tensor,
        attention_mask: Tensor,
        past: KV | None = None,
        position_ids: Tensor | None = None,
    ) -> KV:
        """Keys and values of every block above `layer` for hidden states that will not change.

        With them, `final_hidden_from(..., prefix=...)` runs only the tokens that do change. With `past`
        (keys and values of earlier tokens, from this function), `hidden` holds only the tokens after
        them, `position_ids` their positions and `attention_mask` is additive as in `final_hidden_from`;
        the result covers past and new tokens, but only the new ones are computed.
        """
        if past is not None:
            cache = _FrozenPrefix(past, keep=True)
            self._run_above(layer, hidden, attention_mask, position_ids, cache)
            return {l: cache.kept[l] for l in range(layer + 1, self.n_layers)}
        dynamic = DynamicCache()
        self._run_above(layer, hidden, attention_mask, None, dynamic)
        return {l: (dynamic.layers[l].keys, dynamic.layers[l].values) for l in range(layer + 1, self.n_layers)}

    def final_hidden_from(
        self,
        layer: int,
        hidden: Tensor,
        attention_mask: Tensor,
        position_ids: Tensor | None = None,
        prefix: KV | None = None,
    ) -> Tensor:
        """Final-normed hidden states given the residual stream after block `layer` (differentiable).

        Runs only the blocks above `layer`, so an optimisation step on a hidden state does not pay for
        the layers below it; the LM head is left to the caller, to be applied only where needed.
        With `prefix` (from `prefix_kv`), `hidden` holds only the tokens after it: `position_ids` are
        then their positions in the full sequence and `attention_mask` an additive
        (batch, 1, tokens, prefix + tokens) mask saying which prefix and own tokens each may see.
        """
        return self._run_above(layer, hidden, attention_mask, position_ids, _FrozenPrefix(prefix) if prefix else None)

    @torch.no_grad()
    def input_embeddings(self, ids: Tensor) -> Tensor:
        """The input embedding rows of token ids (as the embedding layer returns them, any scale it applies
        included)."""
        return self.model.get_input_embeddings()(ids.to(self.device))

    def lm_head(self, hidden: Tensor) -> Tensor:
        """Logits in float32 (log-softmax over the vocabulary in bfloat16 would lose the small differences
        z's loss and the metrics compare)."""
        return self.model.get_output_embeddings()(hidden.to(self.dtype)).float()
