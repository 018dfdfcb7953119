"""bench/predict_cost.py's measures of δ geometry and its reading of where a fact's z started, against
hand-worked values."""

from __future__ import annotations

import sys
from pathlib import Path

import polars as pl
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import predict_cost  # noqa: E402


def test_coherence_and_top_direction_share_by_hand() -> None:
    same = torch.tensor([[3.0, 4.0], [3.0, 4.0]])
    opposite = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    orthogonal = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    assert predict_cost.coherence(same) == pytest.approx(1.0)
    assert predict_cost.coherence(opposite) == pytest.approx(0.0)
    assert predict_cost.coherence(orthogonal) == pytest.approx(2**0.5 / 2)  # ‖(1, 1)‖ / 2
    assert predict_cost.top_direction_share(same) == pytest.approx(1.0)
    assert predict_cost.top_direction_share(opposite) == pytest.approx(1.0)  # one line, either sign
    assert predict_cost.top_direction_share(orthogonal) == pytest.approx(0.5)


def test_start_kind_from_the_index_and_for_runs_before_the_predicted_column() -> None:
    index = pl.DataFrame(
        {
            "id": ["a", "b", "c", "d", "e"],
            "batch": [0, 1, 1, 1, 1],
            "anchor": ["a", "b", "b", "d", "e"],
            "earlier": [0, 0, 0, 3, 0],
            "predicted": [0, 100, 0, 0, 0],
        }
    )
    assert predict_cost.start_kind(index).to_list() == ["zero", "predicted", "member", "earlier δ", "zero"]
    # without the column: every own-anchor of batch >= 1 with no earlier object was predicted
    old = index.drop("predicted")
    assert predict_cost.start_kind(old).to_list() == ["zero", "predicted", "member", "earlier δ", "predicted"]


def test_share_along_and_orthogonal_by_hand() -> None:
    rows = torch.tensor([[3.0, 4.0], [0.0, 2.0]])
    unit = torch.tensor([1.0, 0.0])
    assert predict_cost.share_along(rows, unit) == pytest.approx(9 / 29)  # 3² of 3² + 4² + 2²
    assert torch.equal(predict_cost.orthogonal(rows, unit), torch.tensor([[0.0, 4.0], [0.0, 2.0]]))


def test_stored_z_and_facts_follow_the_index_across_files(tmp_path: Path) -> None:
    """A hand-made run folder: δ rows come back in the index's order, whatever file and row hold them."""
    from safetensors.torch import save_file
    from scratch import stored_facts, stored_z

    (tmp_path / "artifacts/z/cache").mkdir(parents=True)
    (tmp_path / "artifacts/prepared").mkdir(parents=True)
    save_file({"delta": torch.tensor([[1.0, 1.0], [2.0, 2.0]])}, tmp_path / "artifacts/z/cache/a.safetensors")
    save_file({"delta": torch.tensor([[3.0, 3.0]])}, tmp_path / "artifacts/z/cache/b.safetensors")
    index = {"id": ["y", "z", "x"], "file": ["b.safetensors", "a.safetensors", "a.safetensors"], "row": [0, 1, 0]}
    pl.DataFrame(index).write_parquet(tmp_path / "artifacts/z/index.parquet")
    edits = {"id": ["x", "y", "z"], "subject": ["s"] * 3, "prompt": ["{} is"] * 3, "target_new": ["X", "Y", "Z"]}
    pl.DataFrame(edits).write_parquet(tmp_path / "artifacts/prepared/edits.parquet")

    def read(path: str) -> bytes:
        return (tmp_path / path).read_bytes()

    got_index, delta = stored_z(read)
    assert got_index["id"].to_list() == ["y", "z", "x"]
    assert torch.equal(delta, torch.tensor([[3.0, 3.0], [2.0, 2.0], [1.0, 1.0]]))
    assert [f.target_new for f in stored_facts(read, ["z", "x"])] == ["Z", "X"]


def test_delta_geometry_by_hand() -> None:
    """Two equal rows (3, 4): all along one direction, ‖Σδ‖ = ‖(6, 8)‖ = 10, mean ‖δ‖ = 5."""
    got = predict_cost.delta_geometry(torch.tensor([[3.0, 4.0], [3.0, 4.0]]))
    assert got == pytest.approx({"coherence": 1.0, "top direction share": 1.0, "norm of sum": 10.0, "mean norm": 5.0})
