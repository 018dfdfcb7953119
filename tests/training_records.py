"""Training records for the trained editors' tests (MEND, SERAC): five people and where they work, each
with paraphrases of its prompt and neighbourhood prompts about someone else (answer Delhi); and the
resume check every trainer must pass."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from ece.config import Params
from ece.data.editor_data import TrainingRecord
from ece.data.facts import Fact
from ece.editing.editor_io import Trained, TrainingCheckpoint
from ece.model.adapter import ModelAdapter


def records() -> list[TrainingRecord]:
    people = [
        ("Anna Berg", "Oslo"),
        ("Tom Hale", "Lima"),
        ("Kim Soo", "Seoul"),
        ("Joe Park", "Kyiv"),
        ("Ida Holm", "Turku"),
    ]
    return [
        TrainingRecord(
            Fact(f"t{i}", s, "{} works in the city of", o),
            f"The workplace of {s} is the city of",
            f"Ravi Shankar{i} works in the city of",
            "Delhi",
            (f"The workplace of {s} is the city of", f"{s} is employed in the city of"),
            (f"Ravi Shankar{i} works in the city of", f"Mo Li{i} works in the city of"),
        )
        for i, (s, o) in enumerate(people)
    ]


def assert_training_resumes_exactly(
    train: Callable[..., Trained], adapter: ModelAdapter, tok, p: Params, tmp: Path
) -> None:
    """A trainer (`ece.editing.trained.TRAINERS`' `train` signature) killed after step 5 of 6 (evaluations
    and checkpoints every 2 steps) resumes from step 4's checkpoint, trains only step 6 again and ends
    with the uninterrupted run's tensors and held-out curve."""
    rec = records()
    quiet = lambda _: None  # noqa: E731
    whole = train(adapter, tok, p, rec[:3], rec[3:], TrainingCheckpoint(tmp / "a"), log=quiet)

    def kill(step: int) -> None:
        if step == 5:  # after the checkpoint of step 4, before the end
            raise KeyboardInterrupt

    checkpoint = TrainingCheckpoint(tmp / "b")
    with pytest.raises(KeyboardInterrupt):
        train(adapter, tok, p, rec[:3], rec[3:], checkpoint, log=quiet, on_step=kill)
    logged: list[str] = []
    resumed = train(adapter, tok, p, rec[:3], rec[3:], checkpoint, log=logged.append)
    assert "train_editor: resuming from the checkpoint at step 4" in logged
    assert sum("step" in m and "held-out" in m for m in logged) == 1  # only step 6 was trained again
    assert whole.tensors.keys() == resumed.tensors.keys()
    assert all(torch.equal(whole.tensors[k], resumed.tensors[k]) for k in whole.tensors)
    assert [c["heldout_loss"] for c in whole.curve] == [c["heldout_loss"] for c in resumed.curve]
