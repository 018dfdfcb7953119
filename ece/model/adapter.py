"""The one place that knows model architectures.

Everything else asks the adapter for "the W_out of layer l as a d × f matrix", "the residual stream
after block l" or "run the blocks above l from this hidden state", never for module names.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
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
    every optimisation step (DynamicCache would append each step's tokens to it)."""

    def __init__(self, kv: KV) -> None:
        super().__init__()
        self.kv = kv

    def update(
        self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args, **kwargs
    ) -> tuple[Tensor, Tensor]:
        keys, values = self.kv[layer_idx]
        return torch.cat([keys, key_states], dim=-2), torch.cat([values, value_states], dim=-2)


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

    def check_layers(self, layers: list[int]) -> None:
        bad = [l for l in layers if not 0 <= l < self.n_layers]
        if bad:
            raise EceError(
                f"edit layers {bad} are out of range: the model has {self.n_layers} layers (0..{self.n_layers - 1})",
                "set edit.layers in params.yaml to layers that exist",
            )

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

        Both are (batch, seq, dim) per layer. The blocks above are skipped, which is what makes
        covariance statistics and key computation cheap for early edited layers.
        """
        keys: dict[int, Tensor] = {}
        outs: dict[int, Tensor] = {}
        last = max([*key_layers, *out_layers])
        handles = []
        for l in key_layers:
            handles.append(
                self.w_out_module(l).register_forward_hook(
                    lambda _m, inp, _o, l=l: keys.__setitem__(l, inp[0].detach())
                )
            )

        def on_block(_m: nn.Module, _i: object, out: object, l: int) -> None:
            if l in out_layers:
                outs[l] = _block_output(out).detach()
            if l == last:
                raise StopForward

        for l in sorted({*out_layers, last}):
            handles.append(self.blocks[l].register_forward_hook(lambda m, i, o, l=l: on_block(m, i, o, l)))
        try:
            self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        except StopForward:
            pass
        finally:
            for h in handles:
                h.remove()
        return keys, outs

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
        gain = norm(torch.ones(1, weight.shape[0], dtype=weight.dtype)).double()[0] * (1 + eps) ** 0.5
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
        if position_ids is None:
            position_ids = torch.arange(hidden.shape[1], device=hidden.device).expand(hidden.shape[0], -1)
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
    def prefix_kv(self, layer: int, hidden: Tensor, attention_mask: Tensor) -> KV:
        """Keys and values of every block above `layer` for hidden states that will not change.

        With them, `final_hidden_from(..., prefix=...)` runs only the tokens that do change.
        """
        cache = DynamicCache()
        self._run_above(layer, hidden, attention_mask, None, cache)
        return {l: (cache.layers[l].keys, cache.layers[l].values) for l in range(layer + 1, self.n_layers)}

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

    def lm_head(self, hidden: Tensor) -> Tensor:
        return self.model.get_output_embeddings()(hidden)
