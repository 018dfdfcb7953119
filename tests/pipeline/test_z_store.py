"""The machine-local z store (ECE_SCRATCH/z) that workspaces share: a fresh workspace (a queued DVC
experiment's temporary copy has no artifacts/z yet) takes every z file another workspace computed
instead of computing it again, and gets the same bytes."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from scratch_project import base_project, run_stage_subprocess

from ece.data.io import link_or_copy


@pytest.mark.parametrize("can_link", [True, False], ids=["hard-link", "copy"])
def test_link_or_copy_makes_the_missing_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, can_link: bool) -> None:
    src = tmp_path / "store" / "a.bin"
    src.parent.mkdir()
    src.write_bytes(b"z file")
    if not can_link:

        def refuse(*_: object) -> None:
            raise OSError("cross-device link")

        monkeypatch.setattr(os, "link", refuse)
    dst = tmp_path / "fresh" / "cache" / "a.bin"
    link_or_copy(src, dst)
    assert dst.read_bytes() == b"z file"
    assert (dst.stat().st_ino == src.stat().st_ino) == can_link
    assert sorted(p.name for p in dst.parent.iterdir()) == ["a.bin"], "no temporary file left behind"


def test_a_fresh_workspace_reuses_the_store(tmp_path_factory: pytest.TempPathFactory) -> None:
    """The store holds what one workspace computed; a copy without artifacts/z computes no batch."""
    work = base_project(tmp_path_factory, "z_store")
    store = tmp_path_factory.mktemp("scratch")
    computed = {p.name: p.read_bytes() for p in (work / "artifacts/z/cache").glob("*.safetensors")}
    assert computed
    (store / "z").mkdir()
    for name in computed:
        shutil.copy(work / "artifacts/z/cache" / name, store / "z" / name)
    shutil.rmtree(work / "artifacts/z")
    done = run_stage_subprocess(work, "precompute_z", {"ECE_SCRATCH": str(store)})
    assert done.returncode == 0, done.stderr[-3000:]
    assert " 0 batches computed" in done.stdout, done.stdout
    reused = {p.name: p.read_bytes() for p in (work / "artifacts/z/cache").glob("*.safetensors")}
    assert reused == computed
