"""Stage `apply_edits`: write the batches into the model in dataset order, then save it with its ledger.

Per batch and edited layer: keys on the current model, the residual spread over the remaining layers,
the method's update (as its ece.methods registry entry says; MEND: its trained editor's transformed
gradient of the batch's prompts; SERAC: no weight, its facts go into the edit memory saved inside the model folder),
and for ECE and AlphaEdit the cache P += K Kᵀ: ece.sequence.apply_plans, fed with the plans the upstream stages stored
(ece.pipeline.read_plans), computed on the original weights.

After every batch its changes are committed to the checkpoint of the run's lineage (ece.audit.checkpoint,
under $ECE_SCRATCH/checkpoint/apply_edits/), kept after the run: a rerun after a kill, or after facts
were appended or changed after batch b, restores the stored batches before the first changed one bit
for bit and computes only the rest (incremental apply). The outputs appear only at the end, in one atomic rename
(artifacts/edited/: the HF model folder, the per-batch deltas, the ledger), then the uncached reports
(reports/ledger_runs.json, ledger.md, timings.json). A NaN/Inf or exploding update, or normal
equations that are not positive definite, stop the stage before anything is saved. Test hook:
ECE_TEST_BATCH_DELAY=<seconds> sleeps after each batch's commit (tests/audit/test_resume.py).
"""

from __future__ import annotations

from ece.artifacts import COVARIANCE
from ece.audit.checkpoint import Checkpoint
from ece.audit.ledger import LEDGER_MD
from ece.config import Params
from ece.data.codehash import code_hash
from ece.data.facts import read_facts
from ece.editing.covariance import load_covariance
from ece.editing.editor import Editor
from ece.editing.trained import edit_memory, load_trained
from ece.methods import method_of
from ece.model.workbench import Workbench
from ece.pipeline import CHECKPOINT, lineage_key, read_dataset_hash, read_plans, write_edited
from ece.sequence import apply_plans, prefix_keys
from ece.stage import run_stage


def main(p: Params) -> None:
    df, facts = read_facts()
    wb = Workbench.open(p)
    method = method_of(p)
    c0 = load_covariance(COVARIANCE, wb.fingerprint, list(method.layers)) if method.needs_covariance else {}
    trained = load_trained(wb, p, df)  # MEND's editor (artifacts/editor), checked; None for the other methods
    editor = Editor(wb.adapter, wb.tok, method, wb.templates, c0, p.update.max_update_norm, trained)
    plans = read_plans(wb, p, df, facts)  # on the original weights, before any batch is written
    lineage = lineage_key(p, method, wb.fingerprint, code_hash(__file__))
    checkpoint = Checkpoint(CHECKPOINT / lineage[:24], prefix_keys(lineage, plans))
    _, stored = apply_plans(editor, p, plans, wb.fingerprint, read_dataset_hash(df), checkpoint)
    memory = edit_memory(trained, wb, p, [bp.facts for bp in plans])  # SERAC's edits; None: the weights hold them
    totals = write_edited(wb, p, checkpoint, stored, len(facts), memory)
    print(f"apply_edits: {len(facts)} facts in {len(plans)} batches; seconds {totals}; ledger in {LEDGER_MD}")


if __name__ == "__main__":
    run_stage(main)
