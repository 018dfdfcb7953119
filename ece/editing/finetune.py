"""FT-L / FT-M baselines: constrained fine-tuning of one W_out on the edit prompts.

FT-L minimises the language-model loss of the whole "prompt + target" text; FT-M (EasyEdit's
"masked" variant) only the target tokens' NLL. Both keep every entry of W − W_original within
±norm_constraint (an L∞ ball, as in ROME's FT-L baseline), by projection after each Adam step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase

from ece.config import FtCfg
from ece.data.facts import Fact
from ece.model.adapter import ModelAdapter
from ece.model.prompts import encode, target_ids


def finetune_labels(
    tok: PreTrainedTokenizerBase, facts: list[Fact], target_only: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """ids, mask and next-token labels (-100: no loss) of each fact's prompt followed by its target."""
    targets = [target_ids(tok, f.target_new) for f in facts]
    enc = encode(tok, [f.prompt for f in facts], [f.subject for f in facts], targets)
    labels = torch.full_like(enc.input_ids, -100)
    for r, tgt in enumerate(targets):
        end = int(enc.lengths[r])
        first = end - len(tgt) if target_only else 1  # first token that gets a loss
        labels[r, first - 1 : end - 1] = enc.input_ids[r, first:end]  # logits at t predict t + 1
    return enc.input_ids, enc.attention_mask, labels


def finetune_delta(
    adapter: ModelAdapter, tok: PreTrainedTokenizerBase, facts: list[Fact], layer: int, cfg: FtCfg, target_only: bool
) -> Tensor:
    """Δ (d, f), float32, that `cfg.steps` Adam steps give W_out of `layer`; the model is left unchanged.

    Adam updates a float32 copy (steps of ~lr = 5e-4 vanish in a bfloat16 weight); the forward reads
    it in the model's dtype.
    """
    ids, mask, labels = (t.to(adapter.device) for t in finetune_labels(tok, facts, target_only))
    param = adapter.w_out_module(layer).weight
    original = param.detach().clone()
    start = original.float()
    trained = start.clone().requires_grad_(True)
    opt = torch.optim.Adam([trained], lr=cfg.lr)
    param.requires_grad_(True)  # only this parameter: the rest of the model stays frozen
    try:
        for _ in tqdm(range(cfg.steps), desc=f"fine-tune layer {layer}", leave=False):
            param.data = trained.data.to(original.dtype)  # the forward reads the parameter; gradients flow to it
            logits = adapter.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
            (grad,) = torch.autograd.grad(loss, param)
            trained.grad = grad.float()
            opt.step()
            with torch.no_grad():
                trained.copy_(start + (trained - start).clamp(-cfg.norm_constraint, cfg.norm_constraint))
    finally:
        param.data = original
        param.requires_grad_(False)
    delta = trained.detach() - start
    return delta.T if adapter.spec.conv1d else delta
