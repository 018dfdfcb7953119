"""Tracing prompts in blocks of about one length instead of one padded block: the keys of a batch (as the
update and ECE's attribution read them) and z's problem (the block output at z's layer and the frozen
prefixes of the blocks above), as up to commit 3f0fea6 ("padded (before)": every prompt traced to its end
in one block padded to the longest row; z's prefixes padded to the longest prefix) against today ("length
blocks (today)": key prompts cut at their subject's last token, rows sorted by length and traced in
blocks each cut to its longest row, `length_sorted_blocks` / `length_blocks`), side by side in one
process on the same loaded model, alternately, `--repeats` times:
- update: `LayerKeys`, layer after layer (the keys of each edited layer and the block output at z's layer);
- attribution: `keys_and_hidden` for every edited layer at once (ECE's neuron selection);
- z problem: `build_problem` for the batch, and its losses at δ = 0.
The model is not edited, so both ways must agree up to float rounding (the difference is reported), and
the key tokens each runs are counted. Writes reports/keys_speed.md and .json.

    python bench/keys_speed.py --n-facts 100 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable

import torch
from scratch import ROOT, first_facts

from ece.config import Params
from ece.data.facts import Fact
from ece.editing import zvec
from ece.editing.keys import LayerKeys, _template_mean, keys_and_hidden, length_sorted_blocks, templated
from ece.model.prompts import at_positions, encode
from ece.model.workbench import Workbench

BEFORE, TODAY = "padded (before)", "length blocks (today)"
PATHS = ("update", "attribution", "z problem")
WHAT = {
    "update": "a layer's keys or the z-layer output",
    "attribution": "a layer's keys",
    "z problem": "h or the per-fact losses at δ = 0",
}
OUT_JSON = ROOT / "reports" / "keys_speed.json"
OUT_MD = ROOT / "reports" / "keys_speed.md"


class FullRowKeys(LayerKeys):
    """LayerKeys as up to commit 3f0fea6: every prompt traced to its end, all rows in one padded block."""

    def __init__(self, wb: Workbench, facts: list[Fact], out_layer: int) -> None:
        super().__init__(wb.adapter, wb.tok, facts, wb.templates, out_layer)
        self.enc = encode(wb.tok, *templated(facts, wb.templates))
        rows = torch.arange(self.enc.input_ids.shape[0])
        self.blocks = [(rows, self.enc.input_ids.shape[1])]
        self.bare = [torch.nonzero(rows % self.t == 0).squeeze(1)]


def full_row_attribution_keys(wb: Workbench, facts: list[Fact], layers: list[int]) -> dict[int, torch.Tensor]:
    """`keys_and_hidden(..., layers)` as up to commit 3f0fea6: prompts traced to their end in one padded block."""
    enc = encode(wb.tok, *templated(facts, wb.templates))
    keys, _ = wb.adapter.trace(enc.input_ids, enc.attention_mask, layers, [])
    at_subject = {l: at_positions(k, enc.subject_pos) for l, k in keys.items()}
    return _template_mean(at_subject, len(facts), len(wb.templates))


def walked(walker: LayerKeys, layers: list[int]) -> dict[int, torch.Tensor]:
    out = {}
    for l in layers:
        keys, hidden = walker(l)
        out[l], out[-1 - l] = keys[l], hidden  # negative: z's-layer output after layer l was asked for
    return out


def z_problem(wb: Workbench, p: Params, facts: list[Fact], padded: bool) -> dict[int, torch.Tensor]:
    """z's problem built as today (rows and prefixes in length blocks, template prefixes shared) or as up
    to commit 3f0fea6 (one padded block each: the block functions replaced by one block of every row, every
    prefix run whole); h and the losses at δ = 0."""
    one_block = {
        "length_sorted_blocks": lambda enc: [(torch.arange(enc.input_ids.shape[0]), enc.input_ids.shape[1])],
        "length_blocks": lambda lengths, _cost: [(0, len(lengths), int(lengths.max()))],
        "MIN_SHARED": 10**9,  # every prefix run whole, as before the shared template prefixes (bench/z_prefix.py)
    }
    saved = {name: getattr(zvec, name) for name in one_block}
    layer = p.edit.layers[-1]
    try:
        if padded:
            for name, fn in one_block.items():
                setattr(zvec, name, fn)
        problem = zvec.build_problem(wb.adapter, wb.tok, facts, layer, wb.templates)
    finally:
        for name, fn in saved.items():
            setattr(zvec, name, fn)
    with torch.no_grad():
        losses = zvec.fact_losses(problem, wb.adapter, layer, torch.zeros_like(problem.h), p.z)
    return {0: problem.h, 1: losses.total}


def paths(
    wb: Workbench, p: Params, facts: list[Fact], layers: list[int]
) -> dict[str, Callable[[], dict[int, torch.Tensor]]]:
    return {
        f"update, {BEFORE}": lambda: walked(FullRowKeys(wb, facts, layers[-1]), layers),
        f"update, {TODAY}": lambda: walked(LayerKeys(wb.adapter, wb.tok, facts, wb.templates, layers[-1]), layers),
        f"attribution, {BEFORE}": lambda: full_row_attribution_keys(wb, facts, layers),
        f"attribution, {TODAY}": lambda: keys_and_hidden(wb.adapter, wb.tok, facts, wb.templates, layers)[0],
        f"z problem, {BEFORE}": lambda: z_problem(wb, p, facts, padded=True),
        f"z problem, {TODAY}": lambda: z_problem(wb, p, facts, padded=False),
    }


def tokens(wb: Workbench, facts: list[Fact], up_to_subject: bool) -> dict[str, int]:
    """Tokens of one pass over the batch: the prompts' own, and those the model runs (with padding: one
    padded block before, the length-sorted blocks today)."""
    enc = encode(wb.tok, *templated(facts, wb.templates), up_to_subject=up_to_subject)
    run = sum(len(rows) * w for rows, w in length_sorted_blocks(enc)) if up_to_subject else enc.input_ids.numel()
    return {"prompt": int(enc.lengths.sum()), "run": run}


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-facts", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    p, wb, facts = first_facts(args.n_facts)
    layers = list(p.edit.layers)
    runs = paths(wb, p, facts, layers)
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    results: dict[str, dict[int, torch.Tensor]] = {}
    load = [os.getloadavg()[0]]
    for _ in range(args.repeats):
        for name, fn in runs.items():
            start = time.perf_counter()
            results[name] = fn()
            seconds[name].append(round(time.perf_counter() - start, 2))
            print(f"{name}: {seconds[name][-1]} s")
    load.append(os.getloadavg()[0])
    med = {name: statistics.median(s) for name, s in seconds.items()}
    ratios = {path: round(med[f"{path}, {BEFORE}"] / med[f"{path}, {TODAY}"], 2) for path in PATHS}
    diff = {
        path: max(
            max_rel(results[f"{path}, {TODAY}"][k], results[f"{path}, {BEFORE}"][k])
            for k in results[f"{path}, {BEFORE}"]
        )
        for path in PATHS
    }
    n_tokens = {"full rows": tokens(wb, facts, False), "cut at subject": tokens(wb, facts, True)}
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "n_facts": len(facts),
        "templates": len(wb.templates),
        "layers": layers,
        "threads": torch.get_num_threads(),
        "load_average": load,
        "tokens": n_tokens,
        "seconds": seconds,
        "ratio_of_medians": ratios,
        "largest_relative_difference": diff,
    }
    OUT_JSON.write_text(json.dumps(report, indent=2) + "\n")
    full_t, cut_t = n_tokens["full rows"], n_tokens["cut at subject"]
    OUT_MD.write_text(
        "\n".join(
            [
                "# Tracing in blocks of one length: keys and z's problem, before and today",
                "",
                f"Generated by `bench/keys_speed.py` on {report['date']}: SmolLM2-135M, the first {len(facts)} "
                f"CounterFact facts, {len(wb.templates)} templates each, edited layers {layers} (z's layer "
                f"{layers[-1]}), {report['threads']} torch thread(s), 1-min load average {load[0]:.1f} at the "
                f"start and {load[1]:.1f} at the end (the seconds are only comparable with each other). All "
                "paths ran alternately in one process on the same unedited model. Key tokens per pass over "
                "the batch, the prompts' own / run (padding included): before "
                f"{full_t['prompt']} / {full_t['run']}, today (cut at the subject) {cut_t['prompt']} / "
                f"{cut_t['run']} ({cut_t['prompt'] / full_t['prompt']:.2f} / {cut_t['run'] / full_t['run']:.2f}).",
                "",
                "| path | seconds (each run) | median |",
                "|---|---|---:|",
                *(f"| {name} | {' / '.join(map(str, s))} | {med[name]:.2f} |" for name, s in seconds.items()),
                "",
                *(
                    f"- {path}: before / today = **{ratios[path]:.2f}×**; largest relative difference (Frobenius) "
                    f"of {WHAT[path]}: {diff[path]:.1e}."
                    for path in ratios
                ),
                "",
            ]
        )
    )
    print(f"before/today {ratios}, largest relative difference {diff} -> {OUT_MD}")


if __name__ == "__main__":
    main()
