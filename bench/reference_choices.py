"""The measured effect of the places where this project deliberately differs from MEMIT's code.

Not a test: a measurement. Two choices are checked, each against the project as shipped, by running
the real stages (bench/scratch.py's `run_stages`, prepare → apply_edits, covariance included) on the
same CounterFact facts and scoring every fact after the last batch:

- `document start`: every prompt (and every covariance chunk) opens with `<|endoftext|>` because
  SmolLM2 adds no BOS token; MEMIT's code feeds the bare text. The variant drops it everywhere,
  the evaluation included (as the reference evaluates).
- `KL direction`: docs/SPEC.md asks for KL(original ‖ current) on "{subject} is a"; MEMIT's
  compute_z computes KL(current ‖ original). The variant uses MEMIT's.

The variants are swapped in for the run only (the library functions are replaced in this process);
the shipped code is unchanged. Writes reports/reference_choices.md / .json.

    python bench/reference_choices.py --n-facts 50 --batch-size 25 --method memit
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import time
from collections.abc import Iterator
from typing import Any

import polars as pl
import torch
from safetensors import safe_open
from scratch import ROOT, inside, run_stages

import ece.editing.covariance
import ece.editing.zvec
import ece.model.prompts
from ece.eval.metrics import fact_metrics, summarise
from ece.model.loading import load_model

WORK = ROOT / ".cache" / "reference_choices"
STAGES = ["prepare", "covariance", "attribute", "cluster", "precompute_z", "apply_edits"]


@contextlib.contextmanager
def no_document_start() -> Iterator[None]:
    original = ece.model.prompts.document_start
    ece.model.prompts.document_start = ece.editing.covariance.document_start = lambda tok: []  # type: ignore[assignment]
    try:
        yield
    finally:
        ece.model.prompts.document_start = ece.editing.covariance.document_start = original  # type: ignore[assignment]


@contextlib.contextmanager
def memit_kl_direction() -> Iterator[None]:
    """fact_losses with KL(current ‖ original): the same function, the KL term's arguments swapped."""
    original = ece.editing.zvec.fact_losses

    def swapped(problem, adapter, layer, delta, cfg):  # noqa: ANN001, ANN202
        losses = original(problem, adapter, layer, delta, cfg)
        hidden = torch.cat([problem.hidden[:, :1] + delta[problem.row_fact, None], problem.hidden[:, 1:]], dim=1)
        final = adapter.final_hidden_from(
            layer,
            hidden[problem.kl_rows],
            problem.attn[problem.kl_rows],
            problem.position_ids[problem.kl_rows],
            {l: (k[problem.kl_rows], v[problem.kl_rows]) for l, (k, v) in problem.prefix.items()},
        )
        cur = torch.log_softmax(adapter.lm_head(final[:, 0]), dim=-1)
        kl = (cur.exp() * (cur - problem.kl_ref)).sum(1)
        return ece.editing.zvec.FactLosses(
            losses.total - cfg.kl_factor * losses.kl + cfg.kl_factor * kl, losses.nll, kl
        )

    ece.editing.zvec.fact_losses = swapped  # type: ignore[assignment]
    try:
        yield
    finally:
        ece.editing.zvec.fact_losses = original  # type: ignore[assignment]


VARIANTS = {
    "as shipped": contextlib.nullcontext,
    "no document start (MEMIT)": no_document_start,
    "KL(current ‖ original) (MEMIT)": memit_kl_direction,
}


def run_variant(name: str, overrides: list[str]) -> dict[str, Any]:
    work = WORK / "".join(c if c.isalnum() else "-" for c in name)
    shutil.rmtree(work, ignore_errors=True)
    with VARIANTS[name]():
        run_stages(overrides, work, STAGES)
        with inside(work):
            facts = pl.read_parquet("artifacts/prepared/edits.parquet")
            pre = summarise(fact_metrics(*load_model("smollm2-135m"), facts))
            post = summarise(fact_metrics(*load_model("artifacts/edited/model"), facts))
            index = pl.read_parquet("artifacts/z/index.parquet")
            z = {}
            for f in index["file"].unique().sort().to_list():
                with safe_open(f"artifacts/z/cache/{f}", framework="pt") as st:
                    z[f] = st.get_tensor("delta")
    return {
        "name": name,
        "pre": pre,
        "post": post,
        "z_nll": float(index["nll"].mean()),
        "z_kl": float(index["kl"].mean()),
        "row_steps": int(index["steps"].sum()),
        "delta": torch.cat([z[f] for f in sorted(z)]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-facts", type=int, default=50)
    ap.add_argument("--batch-size", type=int, default=25)
    ap.add_argument("--method", default="memit")
    args = ap.parse_args()
    overrides = [f"method={args.method}", f"data.n_facts={args.n_facts}", f"edit.batch_size={args.batch_size}"]
    rows = [run_variant(name, overrides) for name in VARIANTS]
    shipped = rows[0]["delta"]
    lines = [
        "# Where the project differs from MEMIT's code, measured",
        "",
        f"Generated by `bench/reference_choices.py` on {time.strftime('%Y-%m-%d')}: method {args.method}, "
        f"SmolLM2-135M, first {args.n_facts} CounterFact facts in batches of {args.batch_size}, params.yaml "
        "otherwise; every fact scored after the last batch (pre → post). cos(δ) compares each fact's z "
        "offset with the shipped one.",
        "",
        "| variant | efficacy | generalization | specificity | score | z NLL | z KL | z row-steps | mean cos(δ, shipped δ) |",
        "|---|---|---|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        cos = torch.nn.functional.cosine_similarity(r["delta"], shipped, dim=1).mean()
        cells = [
            f"{r['pre'][m]:.2f} → {r['post'][m]:.2f}" for m in ("efficacy", "generalization", "specificity", "score")
        ]
        lines.append(
            f"| {r['name']} | "
            + " | ".join(cells)
            + f" | {r['z_nll']:.3f} | {r['z_kl']:.3f} | {r['row_steps']} | {cos:.3f} |"
        )
    md = "\n".join(lines) + "\n"
    (ROOT / "reports" / "reference_choices.md").write_text(md)
    (ROOT / "reports" / "reference_choices.json").write_text(
        json.dumps(
            {"overrides": overrides, "rows": [{k: v for k, v in r.items() if k != "delta"} for r in rows]}, indent=2
        )
    )
    print(md)


if __name__ == "__main__":
    main()
