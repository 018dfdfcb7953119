"""Keys of a batch, as the update and ECE's attribution read them: every prompt traced to its end (as until
2026-12-03) against every prompt cut at its subject's last token (`encode(..., up_to_subject=True)`, today's
keys), side by side in one process on the same loaded model.

Two paths, each with full and cut rows, alternately, `--repeats` times:
- update: `LayerKeys`, layer after layer (the keys of each edited layer and the block output at z's layer);
- attribution: `keys_and_hidden` for every edited layer at once (ECE's neuron selection).
The model is not edited, so full and cut rows must agree up to float rounding (the difference is
reported), and the tokens each traces are counted. Writes reports/keys_speed.md and .json.

    python bench/keys_speed.py --n-facts 100 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

from ece.config import load_params
from ece.data.facts import Fact
from ece.data.loaders import load_edits
from ece.editing.keys import LayerKeys, _template_mean, keys_and_hidden, templated
from ece.model.prompts import encode
from ece.model.workbench import Workbench

ROOT = Path(__file__).resolve().parents[1]
OUT_JSON = ROOT / "reports" / "keys_speed.json"
OUT_MD = ROOT / "reports" / "keys_speed.md"


class FullRowKeys(LayerKeys):
    """LayerKeys on prompts traced to their end, as before the cut."""

    def __init__(self, wb: Workbench, facts: list[Fact], out_layer: int) -> None:
        super().__init__(wb.adapter, wb.tok, facts, wb.templates, out_layer)
        self.enc = encode(wb.tok, *templated(facts, wb.templates))


def full_row_attribution_keys(wb: Workbench, facts: list[Fact], layers: list[int]) -> dict[int, torch.Tensor]:
    """`keys_and_hidden(..., layers)` on prompts traced to their end, as before the cut."""
    enc = encode(wb.tok, *templated(facts, wb.templates))
    keys, _ = wb.adapter.trace(enc.input_ids, enc.attention_mask, layers, [])
    return _template_mean(keys, enc.subject_pos, len(facts), len(wb.templates))


def walked(walker: LayerKeys, layers: list[int]) -> dict[int, torch.Tensor]:
    out = {}
    for l in layers:
        keys, hidden = walker(l)
        out[l], out[-1 - l] = keys[l], hidden  # negative: z's-layer output after layer l was asked for
    return out


def paths(wb: Workbench, facts: list[Fact], layers: list[int]) -> dict[str, Callable[[], dict[int, torch.Tensor]]]:
    return {
        "update, full rows": lambda: walked(FullRowKeys(wb, facts, layers[-1]), layers),
        "update, cut at subject": lambda: walked(
            LayerKeys(wb.adapter, wb.tok, facts, wb.templates, layers[-1]), layers
        ),
        "attribution, full rows": lambda: full_row_attribution_keys(wb, facts, layers),
        "attribution, cut at subject": lambda: keys_and_hidden(wb.adapter, wb.tok, facts, wb.templates, layers)[0],
    }


def tokens(wb: Workbench, facts: list[Fact], up_to_subject: bool) -> dict[str, int]:
    """Tokens of one pass over the batch: the prompts' own, and with the right padding the model runs too."""
    enc = encode(wb.tok, *templated(facts, wb.templates), up_to_subject=up_to_subject)
    return {"prompt": int(enc.lengths.sum()), "padded": enc.input_ids.numel()}


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-facts", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    p = load_params(ROOT / "params.yaml")
    p = replace(p, data=replace(p.data, n_facts=args.n_facts))
    facts = [Fact.from_row(r) for r in load_edits(p.data).iter_rows(named=True)]
    wb = Workbench.open(p)
    layers = list(p.edit.layers)
    runs = paths(wb, facts, layers)
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
    ratios = {
        path: round(med[f"{path}, full rows"] / med[f"{path}, cut at subject"], 2) for path in ("update", "attribution")
    }
    diff = {
        path: max(
            max_rel(results[f"{path}, cut at subject"][k], results[f"{path}, full rows"][k])
            for k in results[f"{path}, full rows"]
        )
        for path in ("update", "attribution")
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
                "# Keys of a batch: prompts traced to their end vs cut at the subject's last token",
                "",
                f"Generated by `bench/keys_speed.py` on {report['date']}: SmolLM2-135M, the first {len(facts)} "
                f"CounterFact facts, {len(wb.templates)} templates each, edited layers {layers} (z's layer "
                f"{layers[-1]}), {report['threads']} torch thread(s), 1-min load average {load[0]:.1f} at the "
                f"start and {load[1]:.1f} at the end (the seconds are only comparable with each other). All "
                "paths ran alternately in one process on the same unedited model. Tokens traced per pass over "
                f"the batch, prompt tokens / with padding: full rows {full_t['prompt']} / {full_t['padded']}, cut "
                f"at the subject {cut_t['prompt']} / {cut_t['padded']} ({cut_t['prompt'] / full_t['prompt']:.2f} / "
                f"{cut_t['padded'] / full_t['padded']:.2f}).",
                "",
                "| path | seconds (each run) | median |",
                "|---|---|---:|",
                *(f"| {name} | {' / '.join(map(str, s))} | {med[name]:.2f} |" for name, s in seconds.items()),
                "",
                *(
                    f"- {path}: full / cut = **{ratios[path]:.2f}×**; largest relative difference (Frobenius) of "
                    f"a layer's keys{' or z-layer output' if path == 'update' else ''}: {diff[path]:.1e}."
                    for path in ratios
                ),
                "",
            ]
        )
    )
    print(f"full/cut {ratios}, largest relative difference {diff} -> {OUT_MD}")


if __name__ == "__main__":
    main()
