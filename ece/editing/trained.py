"""Editors trained before editing: training one (stage train_editor) and loading it, checked, for the
edit sequence (apply_edits, ece.edit); for a method that answers through an edit memory (SERAC), the
memory the edited facts make.

Generic over methods: each method whose registry entry says `trained_editor` has a `Trainer` here (its
training function, how its editor is rebuilt from its tensors, the params section that configures
it); the stage and the apply path look it up and never name a method. The training records come from
ece.data.editor_data; the files from ece.editing.editor_io.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import polars as pl
import torch
from torch import Tensor

from ece.artifacts import EDITOR, SCRATCH
from ece.config import Params
from ece.data.editor_data import FIX, check_disjoint, fact_keys, training_records, training_table
from ece.data.facts import Fact
from ece.data.io import sha256_file, sha256_json
from ece.data.loaders import source_format
from ece.editing import mend, serac
from ece.editing.editor_io import Trained, TrainedEditor, TrainingCheckpoint, read_editor, save_editor
from ece.errors import EceError
from ece.methods import REGISTRY
from ece.model.workbench import Workbench


@dataclass(frozen=True)
class Trainer:
    section: str  # the params section that configures the editor (part of what it was trained from)
    train: Callable[..., Trained]
    load: Callable[[dict[str, Tensor], dict[str, Any]], TrainedEditor]
    loss: str  # what its training curve plots
    apply_only: tuple[str, ...] = ()  # keys of the section used when editing, not in training
    reads_corpus: bool = False  # trains on covariance.corpus too (SERAC's general-text negatives)


TRAINERS: dict[str, Trainer] = {
    "mend": Trainer("mend", mend.train, mend.MendEditor.from_tensors, "c_edit·edit loss + c_loc·locality KL"),
    "serac": Trainer(
        "serac",
        serac.train,
        serac.SeracEditor.from_tensors,
        "scope classifier BCE (balanced)",
        ("threshold",),
        reads_corpus=True,
    ),
}
# Dataset shapes that hold the same kind of facts: an editor trained on one family edits that family.
FAMILIES = {"counterfact": "counterfact", "counterfact_compact": "counterfact", "zsre": "zsre"}


def editor_inputs(p: Params) -> dict[str, Any]:
    """What a trained editor is a function of besides the model and the code; stored with it, and
    compared with params.yaml when it is loaded."""
    data = Path(p.train_editor.data)
    trainer = TRAINERS[p.method]
    settings = {k: v for k, v in asdict(getattr(p, trainer.section)).items() if k not in trainer.apply_only}
    inputs = {
        "method": p.method,
        "train_editor": asdict(p.train_editor),
        "data_sha256": sha256_file(data) if data.is_file() else None,
        trainer.section: settings,
    }
    if trainer.reads_corpus:
        corpus = Path(p.covariance.corpus)
        inputs["corpus_sha256"] = sha256_file(corpus) if corpus.is_file() else None
    return inputs


def train_editor(
    wb: Workbench,
    p: Params,
    code: str,
    folder: Path = EDITOR,
    log: Callable[[str], None] = print,
    on_step: Callable[[int], None] | None = None,
) -> Trained:
    """Train the method's editor on the records train_editor selects (the last `heldout` held out) and
    write it to `folder`. Resumable: the state after each evaluation is kept under the scratch folder,
    keyed by the inputs, the model and the `code` hash, and deleted once the editor is written."""
    trainer = TRAINERS[p.method]
    table, repeated = training_table(p.train_editor)
    n_train = table.height - p.train_editor.heldout
    inputs = editor_inputs(p)
    key = sha256_json({"inputs": inputs, "model": wb.fingerprint, "code": code, "torch": torch.__version__})
    checkpoint = TrainingCheckpoint(SCRATCH / "checkpoint" / "train_editor" / key[:24])
    records = training_records(table)
    result = trainer.train(wb.adapter, wb.tok, p, records[:n_train], records[n_train:], checkpoint, log, on_step)
    config = {
        "method": p.method,
        "model": p.model.name,
        "model_fingerprint": wb.fingerprint,
        "inputs": inputs,
        "format": source_format(table),
        "n_train": n_train,
        "n_heldout": p.train_editor.heldout,
        "n_left_out_as_repeats": repeated,  # facts of the range that also occur outside it
        **result.config,
    }
    split = ["train"] * n_train + ["heldout"] * p.train_editor.heldout
    facts = pl.DataFrame({"id": table["id"], "fact_key": fact_keys(table), "split": split})
    save_editor(folder, result.tensors, config, facts)
    checkpoint.clear()
    return result


def load_trained(wb: Workbench, p: Params, edits: pl.DataFrame, folder: Path = EDITOR) -> TrainedEditor | None:
    """The trained editor of `p.method` (None for a method without one), refused when it was trained for
    another model, from other data or settings than params.yaml names, on another family of facts, or on
    any of the facts in `edits`."""
    if not REGISTRY[p.method].trained_editor:
        return None
    tensors, config, facts = read_editor(folder, p.method, wb.fingerprint, editor_inputs(p))
    trained_on, editing = FAMILIES.get(config.get("format", "")), FAMILIES.get(source_format(edits))
    if trained_on and editing and trained_on != editing:
        raise EceError(
            f"the editor in {folder} was trained on {trained_on} records; the facts being edited are {editing}",
            f"point train_editor.data at {editing} training records, then {FIX}",
        )
    check_disjoint(set(facts["fact_key"].to_list()), edits)
    return TRAINERS[p.method].load(tensors, config)


def edit_memory(
    trained: TrainedEditor | None, wb: Workbench, p: Params, batches: list[list[Fact]]
) -> serac.EditMemory | None:
    """The edit memory a method that answers through one (SERAC) holds after `batches`, in order; None
    for a method that writes weights."""
    if not REGISTRY[p.method].memory:
        return None
    assert isinstance(trained, serac.SeracEditor), "a memory method's trained editor builds its memory"
    return trained.memory(wb.adapter, wb.tok, batches, p.serac.threshold)
