"""Second moments C0 = E[k kᵀ]: against a plain float64 computation, token count, and the stored file's checks."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from ece.editing import covariance
from ece.editing.covariance import corpus_texts, load_covariance, save_covariance, second_moments, token_chunks
from ece.errors import EceError
from ece.model.adapter import ModelAdapter
from ece.model.loading import model_fingerprint
from ece.model.prompts import document_start

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Paris is the capital of France, and Rome is the capital of Italy.",
    "Knowledge editing rewrites facts stored in the weights of a language model.",
    "A short one.",
    "Tokens are packed into chunks of whole documents without padding.",
]


def _plain_second_moments(model, tok, layers, n_tokens, seq_len) -> dict[int, torch.Tensor]:
    """E[k kᵀ] written without ece.editing.covariance: the corpus packed by hand, the whole model run on one
    chunk at a time with plain forward hooks, and float64 outer products summed token by token."""
    flat: list[int] = []
    for text in TEXTS:
        flat += document_start(tok) + tok(text, add_special_tokens=False).input_ids
    chunks = [flat[i : i + seq_len] for i in range(0, len(flat) - seq_len + 1, seq_len)]
    w_out = ModelAdapter(model).w_out_module  # used only to find the module to hook
    captured: dict[int, list[torch.Tensor]] = {l: [] for l in layers}
    handles = [
        w_out(l).register_forward_hook(lambda _m, inp, _o, l=l: captured[l].append(inp[0][0].detach())) for l in layers
    ]
    try:
        with torch.no_grad():
            for chunk in chunks:
                ids = torch.tensor([chunk])
                model(ids, attention_mask=torch.ones_like(ids))
    finally:
        for h in handles:
            h.remove()
    out = {}
    for l in layers:
        keys = torch.cat(captured[l])[:n_tokens]
        assert keys.shape[0] == n_tokens
        total = torch.zeros(keys.shape[1], keys.shape[1], dtype=torch.float64)
        for k in keys:
            total += torch.outer(k.double(), k.double())
        out[l] = total / n_tokens
    return out


def _assert_matches_float64(m: torch.Tensor, ref: torch.Tensor) -> None:
    """`second_moments` sums each batch's outer products in float32 before adding them in float64:
    ~1e-7 relative here and on SmolLM2, where 1e-5 is the requirement. A wrong token, window or
    layer is off by ~1e-2. Each entry is held to its Cauchy–Schwarz scale √(C_ii C_jj), which a
    near-zero off-diagonal entry cannot hide behind."""
    assert m.dtype == torch.float64
    assert ((m - ref).norm() / ref.norm()).item() < 1e-6
    scale = torch.outer(ref.diagonal(), ref.diagonal()).sqrt()
    assert ((m - ref).abs() <= 1e-5 * scale).all()


def test_token_chunks_are_full_and_start_documents(tiny_llama):
    _, tok = tiny_llama
    chunks = list(token_chunks(TEXTS, tok, 16))
    assert chunks and all(len(c) == 16 for c in chunks)
    flat = [t for c in chunks for t in c]
    expected: list[int] = []
    for text in TEXTS:
        expected += document_start(tok) + tok(text, add_special_tokens=False).input_ids
    assert flat == expected[: len(flat)]
    assert len(expected) - len(flat) < 16  # only the incomplete tail is dropped


def test_token_chunks_open_documents_with_the_tokenizers_own_bos(tiny_llama, byte_tok_with_bos):
    """A tokenizer that adds its own BOS (Gemma) opens every document with it, once: the same chunks
    as the plain tokenizer given the same token as its document start."""
    _, tok = tiny_llama
    assert document_start(byte_tok_with_bos) == []
    chunks = list(token_chunks(TEXTS, byte_tok_with_bos, 16))
    assert chunks == list(token_chunks(TEXTS, tok, 16))
    assert sum(c.count(tok.eos_token_id) for c in chunks) == len(TEXTS)  # every document start, in full chunks


@pytest.mark.parametrize(
    ("kind_fixture", "n_tokens", "batch_size"),
    [("tiny_llama", 100, 2), ("tiny_llama", 16, 1), ("tiny_gpt2", 37, 3), ("tiny_llama", 100, 64)],
)
def test_second_moments_match_plain_float64(request, kind_fixture, n_tokens, batch_size):
    model, tok = request.getfixturevalue(kind_fixture)
    adapter = ModelAdapter(model)
    layers = [0, 2]
    moments, seen = second_moments(
        adapter, tok, layers, TEXTS, n_tokens, seq_len=16, batch_size=batch_size, progress=False
    )
    assert seen == n_tokens
    ref = _plain_second_moments(model, tok, layers, n_tokens, 16)
    assert sorted(moments) == layers
    for l in layers:
        m = moments[l]
        assert m.shape == (64, 64)
        _assert_matches_float64(m, ref[l])
        assert torch.equal(m, m.T)
        eig = torch.linalg.eigvalsh(m)
        assert eig.min() > -1e-6 * eig.max()  # PSD up to float32 rounding (37 tokens < 64 dims leaves exact zeros)
    # different layers have different statistics
    assert not torch.allclose(moments[0], moments[2])


def test_second_moments_in_column_blocks_match_plain_float64(tiny_llama, monkeypatch):
    """f = 64 fits one block of the real size: blocks of 24 (24, 24, 16) run the blocked path."""
    model, tok = tiny_llama
    monkeypatch.setattr(covariance, "_GRAM_BLOCK", 24)
    moments, _ = second_moments(ModelAdapter(model), tok, [1, 3], TEXTS, 100, seq_len=16, batch_size=2, progress=False)
    ref = _plain_second_moments(model, tok, [1, 3], 100, 16)
    for l in (1, 3):
        _assert_matches_float64(moments[l], ref[l])
        assert torch.equal(moments[l], moments[l].T)


def test_second_moments_stops_at_corpus_end(tiny_gpt2):
    model, tok = tiny_gpt2
    adapter = ModelAdapter(model)
    available = sum(len(c) for c in token_chunks(TEXTS, tok, 16))
    moments, seen = second_moments(adapter, tok, [1], TEXTS, 10**6, seq_len=16, batch_size=4, progress=False)
    assert seen == available
    _assert_matches_float64(moments[1], _plain_second_moments(model, tok, [1], available, 16)[1])


def test_second_moments_runs_no_chunk_past_n_tokens(tiny_llama):
    model, tok = tiny_llama
    adapter = ModelAdapter(model)
    traced: list[int] = []
    trace = adapter.trace

    def counting_trace(ids, *args, **kwargs):
        traced.append(ids.shape[0])
        return trace(ids, *args, **kwargs)

    adapter.trace = counting_trace  # type: ignore[method-assign]
    _, seen = second_moments(adapter, tok, [0], TEXTS, 40, seq_len=16, batch_size=8, progress=False)
    assert seen == 40
    assert traced == [3]  # 40 tokens need 3 chunks of 16, not the batch of 8


def test_second_moments_empty_corpus(tiny_llama):
    model, tok = tiny_llama
    with pytest.raises(EceError, match="no tokens"):
        second_moments(ModelAdapter(model), tok, [0], ["tiny"], 100, seq_len=64, batch_size=2, progress=False)


# --- save / load -------------------------------------------------------------------------------


@pytest.fixture
def stored(tiny_llama, tmp_path):
    model, tok = tiny_llama
    adapter = ModelAdapter(model)
    moments, _ = second_moments(adapter, tok, [1, 3], TEXTS, 50, seq_len=16, batch_size=2, progress=False)
    fp = model_fingerprint(model)
    path = tmp_path / "cov" / "c0.safetensors"
    save_covariance(path, moments, {"model_fingerprint": fp, "n_tokens": 50})
    return path, moments, fp


def test_save_load_round_trip(stored):
    path, moments, fp = stored
    loaded = load_covariance(path, fp, [1, 3])
    assert sorted(loaded) == [1, 3]
    for l in (1, 3):
        assert loaded[l].dtype == torch.float64
        assert torch.equal(loaded[l], moments[l])
    assert list(load_covariance(path, fp, [3])) == [3]  # a subset of the stored layers is fine
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]


def test_load_refuses_wrong_fingerprint(stored):
    path, _, fp = stored
    with pytest.raises(EceError, match="another model") as err:
        load_covariance(path, "0" * 16, [1, 3])
    assert fp in str(err.value)


def test_load_refuses_missing_layers(stored):
    path, _, fp = stored
    with pytest.raises(EceError, match=r"no statistics for layers \[2\]"):
        load_covariance(path, fp, [1, 2, 3])


def test_load_refuses_missing_file(tmp_path):
    with pytest.raises(EceError, match="not found"):
        load_covariance(tmp_path / "nope.safetensors", "x", [0])


@pytest.mark.parametrize("content", [b"", b"garbage", bytes(range(256)) * 8])
def test_load_refuses_corrupted_file(stored, content):
    path, _, fp = stored
    path.write_bytes(content)
    with pytest.raises(EceError, match="not a readable safetensors file"):
        load_covariance(path, fp, [1, 3])


def test_load_refuses_random_bytes(stored):
    path, _, fp = stored
    g = torch.Generator().manual_seed(0)
    path.write_bytes(bytes(torch.randint(0, 256, (4096,), generator=g, dtype=torch.uint8).tolist()))
    with pytest.raises(EceError):
        load_covariance(path, fp, [1, 3])


def test_load_refuses_truncated_file(stored):
    path, _, fp = stored
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(EceError):
        load_covariance(path, fp, [1, 3])


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_load_refuses_non_finite(stored, bad):
    path, moments, fp = stored
    broken = {l: m.clone() for l, m in moments.items()}
    broken[3][5, 7] = bad
    save_covariance(path, broken, {"model_fingerprint": fp})
    with pytest.raises(EceError, match="layer 3 contain NaN or Inf"):
        load_covariance(path, fp, [1, 3])
    assert load_covariance(path, fp, [1])[1].isfinite().all()  # only the layers asked for are checked


def test_load_refuses_file_without_metadata(stored):
    path, moments, fp = stored
    save_file({f"layer.{l}": m for l, m in moments.items()}, str(path))
    with pytest.raises(EceError, match="another model"):
        load_covariance(path, fp, [1, 3])


# --- corpus_texts ------------------------------------------------------------------------------


def test_corpus_texts_jsonl_and_txt(tmp_path):
    jl = tmp_path / "c.jsonl"
    jl.write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "two", "x": 1}) + "\n")
    assert list(corpus_texts(jl)) == ["one", "two"]
    txt = tmp_path / "c.txt"
    txt.write_text("first para\nline two\n\nsecond\n\n\n")
    assert [t.strip() for t in corpus_texts(txt)] == ["first para\nline two", "second"]


def test_corpus_texts_missing_file(tmp_path):
    with pytest.raises(EceError, match="corpus file not found"):
        list(corpus_texts(tmp_path / "missing.jsonl"))


@pytest.mark.parametrize("bad", ["{not json", '{"txt": "wrong key"}', "[1, 2]", '"just a string"'])
def test_corpus_texts_bad_jsonl_line_names_the_line(tmp_path, bad):
    jl = tmp_path / "c.jsonl"
    jl.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"text": "ok2"}) + "\n" + bad + "\n")
    it = corpus_texts(jl)
    assert next(it) == "ok" and next(it) == "ok2"
    with pytest.raises(EceError) as err:
        next(it)
    assert f"{jl}:3:" in str(err.value)
