"""Stage `covariance`: C0 = E[k kᵀ] of the W_out inputs of every edited layer over the corpus.

The cached file carries what C0 was computed from (model fingerprint, corpus hash, token count);
reports/covariance.json adds the seconds it took, which stay out of the cached file so that an
identical recompute gives identical bytes. `torchrun --nproc_per_node N -m stages.covariance` shares
the corpus chunks out over N processes (ece.model.distributed); rank 0 alone writes.
"""

from __future__ import annotations

import time

from ece.config import Params
from ece.data.io import sha256_file, write_json
from ece.editing.covariance import estimate_covariance, n_chunks, save_covariance
from ece.model import distributed
from ece.model.adapter import ModelAdapter
from ece.model.loading import load_for, model_fingerprint
from ece.stage import run_stage

OUT = "artifacts/covariance/c0.safetensors"


def main(p: Params) -> None:
    hint = "start at most that many processes, or raise covariance.n_tokens"
    cfg = p.covariance
    distributed.start(n_chunks(cfg.n_tokens, cfg.seq_len), f"corpus chunks of {cfg.seq_len} tokens", hint)
    model, tok = load_for(p)
    adapter = ModelAdapter(model)
    adapter.check_layers(p.edit.layers)
    start = time.perf_counter()
    part = (distributed.rank(), distributed.world_size())
    moments, n = estimate_covariance(adapter, tok, p.edit.layers, p.covariance, part, distributed.all_sum)
    if not distributed.is_main():
        return
    meta = {
        "model": p.model.name,
        "model_fingerprint": model_fingerprint(model),
        "corpus": p.covariance.corpus,
        "corpus_sha256": sha256_file(p.covariance.corpus),
        "n_tokens": n,
        "layers": ",".join(map(str, p.edit.layers)),
    }
    seconds = round(time.perf_counter() - start, 1)
    save_covariance(OUT, moments, meta)
    write_json("reports/covariance.json", {**meta, "seconds": seconds})
    print(f"covariance: {n} tokens, layers {p.edit.layers}, {seconds} s")


if __name__ == "__main__":
    run_stage(main)
