"""Stage `train_editor`: the editor a method trains before it edits (MEND; SERAC's scope classifier), or a
fixed marker.

For a method whose registry entry has `trained_editor`, its trainer (ece.editing.trained) learns the
editor from the records train_editor.id_range selects in train_editor.data (never facts being
edited: apply_edits checks), holding the last train_editor.heldout out for the curve and early
stopping, and writes artifacts/editor (safetensors + JSON config with the base model's fingerprint and
what it was trained from). A killed run resumes from its last checkpoint ($ECE_SCRATCH/checkpoint/
train_editor/). Every other method writes only artifacts/editor/editor.json = {"trained_editor": null},
the same bytes for each, so DVC sees one unchanged output and reruns nothing after it.
reports/editor_curve.json (train and held-out loss per evaluation, seconds) and its PNG are run facts,
uncached.
"""

from __future__ import annotations

from ece.artifacts import EDITOR, EDITOR_CURVE, EDITOR_PLOT
from ece.config import Params
from ece.data.codehash import code_hash
from ece.data.io import write_json
from ece.editing.editor_io import write_marker
from ece.eval.plotting import plot_training_curve
from ece.methods import REGISTRY
from ece.stage import run_stage


def main(p: Params) -> None:
    if not REGISTRY[p.method].trained_editor:
        write_marker(EDITOR)
        write_json(EDITOR_CURVE, {"method": p.method, "trained_editor": False, "curve": []})
        plot_training_curve([], f"method {p.method} trains no editor", EDITOR_PLOT)
        print(f"train_editor: method {p.method} needs no trained editor; wrote the marker {EDITOR}/editor.json")
        return
    # Imported only for a trained editor: the trainers and the model code take 4-7 s to import, which
    # every other method's run (the default pipeline's included) would pay to write a marker.
    from ece.editing.trained import TRAINERS, train_editor
    from ece.model.workbench import Workbench

    result = train_editor(Workbench.open(p), p, code_hash(__file__))
    c = result.config
    write_json(EDITOR_CURVE, {"method": p.method, "trained_editor": True, **c, "curve": result.curve})
    plot_training_curve(result.curve, f"{p.method} editor, {p.model.name}", EDITOR_PLOT, TRAINERS[p.method].loss)
    seconds = result.curve[-1]["seconds"] if result.curve else 0.0
    print(
        f"train_editor: {c['steps']} steps in {seconds} s; best held-out loss {c['heldout_loss']:.4f} at step {c['best_step']}"
    )


if __name__ == "__main__":
    run_stage(main)
