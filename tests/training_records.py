"""Training records for the trained editors' tests (MEND, SERAC): five people and where they work, each
with paraphrases of its prompt and neighbourhood prompts about someone else (answer Delhi)."""

from __future__ import annotations

from ece.data.editor_data import TrainingRecord
from ece.data.facts import Fact


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
