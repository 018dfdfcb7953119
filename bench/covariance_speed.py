"""Tokens per second of the covariance statistics: today's code against an earlier revision's, back to back.

Not a test: a measurement. The earlier `ece/covariance.py` is read from git (`--base`, default the
revision before the float32 block change) into a module of its own, and both compute C0 of the same
corpus tokens on the same loaded model, alternately, `--reps` times. Writes reports/<--out>.md
(default covariance_speed), naming the CPU: the ratio depends on the machine's float32 and float64 rates.

It also gives this machine's ceiling for any float32 implementation: the matrix-product flops one
token needs (every linear layer the traced forward runs, counted by hooks, plus the Grams) at the
rate of a large float32 matmul here. Attention's own products and the elementwise work are not
counted, so no float32 code can beat that ceiling; its ratio to the base says whether a speed-up
target is reachable at all on this CPU.

    python bench/covariance_speed.py --tokens 20000 --reps 2
    python bench/covariance_speed.py --out covariance_speed_xeon   # another machine's run, kept beside it
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from scratch import ROOT, cpu_name
from torch import nn

from ece.editing import covariance as current
from ece.model.adapter import ModelAdapter
from ece.model.loading import load_model

CORPUS = ROOT / "data/corpus/wikipedia_vital_summaries_en.jsonl"
LAYERS = [3, 4, 5, 6, 7]


# Where the modules an older covariance.py imports live since the library was split into wings.
MOVED = {"ece.adapter": "ece.model.adapter", "ece.keys": "ece.model.prompts", "ece.io": "ece.data.io"}


def module_at(revision: str):  # noqa: ANN201
    for old, new in MOVED.items():
        sys.modules.setdefault(old, importlib.import_module(new))
    source = subprocess.run(
        ["git", "show", f"{revision}:ece/covariance.py"], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout
    path = Path(tempfile.mkdtemp()) / "covariance_base.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("covariance_base", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["covariance_base"] = module
    spec.loader.exec_module(module)
    return module


def matmul_rate(n: int = 4096, reps: int = 5) -> float:
    """This CPU's float32 matrix-multiply rate in flop/s: the fastest of `reps` n × n products on torch's
    threads (after one to warm up), i.e. what its BLAS reaches on a product large enough to saturate it."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def product_flops_per_token(adapter: ModelAdapter, tok, seq_len: int) -> tuple[float, float]:  # noqa: ANN001
    """(linear, gram) matrix-product flops per corpus token of `second_moments`: every nn.Linear that
    one traced chunk runs (hooks count 2 · inputs · outputs per row) and the upper-block Grams of
    `_add_upper_gram` for each layer in LAYERS."""
    ids = torch.tensor([next(current.token_chunks(current.corpus_texts(CORPUS), tok, seq_len))])
    counted = [0]

    def count(m: nn.Linear, inp: tuple[torch.Tensor, ...], _out: object) -> None:
        counted[0] += 2 * inp[0].numel() * m.out_features

    handles = [m.register_forward_hook(count) for m in adapter.model.modules() if isinstance(m, nn.Linear)]
    try:
        with torch.no_grad():
            adapter.trace(ids, torch.ones_like(ids), key_layers=LAYERS)
    finally:
        for h in handles:
            h.remove()
    f, block = adapter.inner_size, current._GRAM_BLOCK
    gram = sum(2 * min(block, f - a) * (f - a) for a in range(0, f, block)) * len(LAYERS)
    return counted[0] / seq_len, float(gram)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="310fe7d")
    ap.add_argument("--base-batch-size", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=20000)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--out", default="covariance_speed", help="report name: reports/<out>.md")
    args = ap.parse_args()
    base = module_at(args.base)
    model, tok = load_model("smollm2-135m", 0)
    adapter = ModelAdapter(model)
    rows = []
    for rep in range(args.reps):
        for name, module, batch in (("base", base, args.base_batch_size), ("current", current, args.batch_size)):
            start = time.perf_counter()
            moments, n = module.second_moments(
                adapter, tok, LAYERS, module.corpus_texts(CORPUS), args.tokens, 128, batch, progress=False
            )
            rows.append((rep, name, batch, n / (time.perf_counter() - start), moments))
    ref = rows[0][4]
    rate = matmul_rate()
    linear, gram = product_flops_per_token(adapter, tok, 128)
    ceiling = rate / (linear + gram)
    base_tps = min(tps for _, name, _, tps, _ in rows if name == "base")
    lines = [
        "# Covariance: tokens per second",
        "",
        f"Generated by `bench/covariance_speed.py` on {time.strftime('%Y-%m-%d')} ({os.cpu_count()} CPU cores, "
        f"{cpu_name()}): SmolLM2-135M, layers {LAYERS}, "
        f"{args.tokens} tokens in chunks of 128, base = ece/covariance.py at {args.base}; alternating runs in one "
        "process.",
        "",
        "| rep | code | batch | tokens/s | max relative difference of C0 vs base |",
        "|---:|---|---:|---:|---:|",
    ]
    for rep, name, batch, tps, moments in rows:
        rel = max(float((moments[l] - ref[l]).norm() / ref[l].norm()) for l in LAYERS)
        lines.append(f"| {rep} | {name} | {batch} | {tps:.0f} | {rel:.2e} |")
    lines += [
        "",
        f"Ceiling of any float32 implementation on this machine: a 4096² float32 matmul runs at {rate / 1e9:.0f} "
        f"GFLOP/s here; one token needs {(linear + gram) / 1e6:.1f} MFLOP of matrix products ({linear / 1e6:.1f} in "
        f"the linear layers the traced forward runs, {gram / 1e6:.1f} in the five upper-block Grams; attention's "
        f"own products and the elementwise work not counted), so at most **{ceiling:.0f} tok/s = "
        f"{ceiling / base_tps:.2f}× the base's slowest rep** ({base_tps:.0f} tok/s). "
        + "; ".join(
            f"{name} rep {rep}: {tps * (linear + gram) / rate:.0%} of that rate" for rep, name, _, tps, _ in rows
        )
        + ".",
    ]
    md = "\n".join(lines) + "\n"
    (ROOT / "reports" / f"{args.out}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
