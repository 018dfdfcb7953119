"""Shared fixtures: tiny random models (built in ~0.1 s) and a handful of facts."""

from __future__ import annotations

import pytest
import torch
from tokenizers import processors
from transformers import PreTrainedTokenizerFast

from ece.data.facts import Fact
from ece.model.loading import EOS, byte_tokenizer, tiny_model

# The models are tiny: one thread is faster than several, and immune to OpenMP spin-waiting when
# other processes share the cores.
torch.set_num_threads(1)


@pytest.fixture
def tiny_llama():
    """(model, tok) of a 4-layer random Llama (d = 32, f = 64) with the byte tokenizer."""
    return tiny_model("tiny-llama", seed=0)


@pytest.fixture
def tiny_gpt2():
    """(model, tok) of a 4-layer random GPT-2 (d = 32, f = 64) with the byte tokenizer."""
    return tiny_model("tiny-gpt2", seed=0)


@pytest.fixture
def byte_tok_with_bos() -> PreTrainedTokenizerFast:
    """The tiny models' byte tokenizer, but adding <|endoftext|> as its own BOS (as Gemma's adds <bos>):
    the same ids the plain one gets from `document_start`, reached the other way."""
    tok = byte_tokenizer()
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{EOS} $A", special_tokens=[(EOS, tok.eos_token_id)]
    )
    return tok


@pytest.fixture
def facts() -> list[Fact]:
    """Facts with distinct subjects; the subject sits at the start, middle and end of the prompts."""
    return [
        Fact("f0", "Paris", "{} is the capital of", "Rome"),
        Fact("f1", "Danielle Darrieux", "The mother tongue of {} is", "English"),
        Fact("f2", "Toko Yasuda", "{} plays the", "piano"),
        Fact("f3", "Apple A5", "The company that made {}", "Google"),
    ]


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
