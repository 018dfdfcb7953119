"""Stage `precompute_z`: target hidden states z for every fact, on the ORIGINAL model.

Per batch, z warm-started within the groups z.warm_start makes of ECE's clusters (ece.editing.zvec,
ece.editing.zvec), batched; MEMIT, AlphaEdit and ROME are the every-fact-alone case (ROME at its one
layer), and fine-tuning needs no z (the stage then writes an empty index). Results are cached per batch
under a key of the batch's content, its groups, the z params, the model and the z code
(ece.editing.zcache), so appending facts to the dataset only computes z for the new batches
(the output folder is `persist` in dvc.yaml for that reason).
"""

from __future__ import annotations

from ece.config import Params
from ece.data.codehash import code_hash
from ece.data.facts import read_facts
from ece.editing.zcache import precompute_z
from ece.methods import method_of
from ece.model.workbench import Workbench
from ece.stage import run_stage


def main(p: Params) -> None:
    df, facts = read_facts()
    wb = Workbench.open(p)
    code = code_hash(__file__)  # the z code: this script and what it imports
    table, computed, factor = precompute_z(wb, p, df, facts, code)
    if not method_of(p).needs_z:
        print(f"precompute_z: method {p.method} needs no z")
        return
    n_batches = table["batch"].n_unique()
    print(
        f"precompute_z: {len(facts)} facts, {computed} batches computed, {n_batches - computed} reused; "
        f"mean target NLL {table['nll'].mean():.3f}, {table['steps'].sum()} z row-steps; anchors started from "
        f"earlier facts' δ: {(table['earlier'] > 0).sum()}, from a predicted δ: {(table['predicted'] > 0).sum()}"
        + (f" (factor on the prediction now: {factor:.3f})" if factor is not None else "")
    )


if __name__ == "__main__":
    run_stage(main)
