"""The loaded model with everything derived from it that several stages need."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from transformers import PreTrainedTokenizerBase

from ece.config import Params
from ece.model.adapter import ModelAdapter
from ece.model.loading import load_for, model_fingerprint
from ece.model.prompts import context_templates


@dataclass
class Workbench:
    """The loaded model with everything derived from it that several stages need."""

    model: nn.Module
    tok: PreTrainedTokenizerBase
    adapter: ModelAdapter
    templates: list[str]
    fingerprint: str

    @classmethod
    def open(cls, p: Params) -> Workbench:
        """Load `model.name` as params.yaml says."""
        return cls.of(*load_for(p), p)

    @classmethod
    def of(cls, model: nn.Module, tok: PreTrainedTokenizerBase, p: Params) -> Workbench:
        """An already loaded model (the programmatic API): checked against edit.layers, with its templates."""
        adapter = ModelAdapter(model)
        adapter.check_layers(p.edit.layers)
        templates = context_templates(model, tok, p.z.n_context, p.z.context_length)
        return cls(model, tok, adapter, templates, model_fingerprint(model))
