"""dvc.yaml declares, for every stage, exactly the project modules its script runs, so that changing a
module reruns the stages that import it (and no others); and the import closure behind it (and behind
the code hashes in cache keys) follows every form of import. Fast: nothing is imported or run."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import yaml

from ece.data.codehash import code_hash, import_closure

ROOT = Path(__file__).resolve().parents[2]
STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


# A project with every kind of import: absolute, `from package import module`, `from module import name`,
# relative, inside a function, a cycle, and imports from outside the project (stdlib, torch, a name
# that merely shares its first part with a project folder).
EXAMPLE = {
    "pkg/__init__.py": '"""pkg."""\n',
    "pkg/a.py": "import os\nimport torch.nn\nfrom pkg.b import thing\n",
    "pkg/b.py": "from . import c\nthing = 1\n",
    "pkg/c.py": "def later():\n    import pkg.sub.d\n",
    "pkg/sub/__init__.py": "",
    "pkg/sub/d.py": "from ..a import os  # cycle back to a\nfrom pkg.sub import *\n",
    "pkg/unused.py": "import pkg.a\n",
    "data/readme.txt": "not code\n",
    "scripts/run.py": "from pkg import a\nimport data.readme\nimport json\n",
}


def test_import_closure_follows_every_kind_of_import(tmp_path: Path) -> None:
    write(tmp_path, EXAMPLE)
    found = {p.relative_to(tmp_path).as_posix() for p in import_closure(tmp_path / "scripts/run.py", tmp_path)}
    assert found == {
        "scripts/run.py",
        "pkg/__init__.py",
        "pkg/a.py",
        "pkg/b.py",
        "pkg/c.py",
        "pkg/sub/__init__.py",
        "pkg/sub/d.py",
    }


def test_code_hash_sees_exactly_the_imported_code(tmp_path: Path) -> None:
    write(tmp_path / "one", EXAMPLE)
    shutil.copytree(tmp_path / "one", tmp_path / "two")

    def key(root: Path) -> str:
        return code_hash(root / "scripts/run.py", root)

    assert key(tmp_path / "one") == key(tmp_path / "two")  # where the project lies does not matter
    (tmp_path / "two/pkg/unused.py").write_text("changed = True\n")
    assert key(tmp_path / "one") == key(tmp_path / "two")
    (tmp_path / "two/pkg/sub/d.py").write_text("changed = True\n")  # reached only through a lazy import
    assert key(tmp_path / "one") != key(tmp_path / "two")


def script_of(stage: dict) -> Path:
    match = re.fullmatch(r"python -m stages\.(\w+)", stage["cmd"])
    assert match, f"unexpected cmd {stage['cmd']!r}: this test knows `python -m stages.<name>`"
    return ROOT / "stages" / f"{match.group(1)}.py"


def test_every_stage_runs_a_stage_script() -> None:
    scripts = {script_of(stage).name for stage in STAGES.values()}
    assert scripts == {p.name for p in (ROOT / "stages").glob("*.py")} - {"__init__.py"}


@pytest.mark.parametrize("name", list(STAGES))
def test_stage_deps_are_the_import_closure_of_its_script(name: str) -> None:
    script = script_of(STAGES[name])
    deps = {d if isinstance(d, str) else next(iter(d)) for d in STAGES[name]["deps"]}
    assert script.relative_to(ROOT).as_posix() in deps
    imported = {p.relative_to(ROOT).as_posix() for p in import_closure(script)} - {script.relative_to(ROOT).as_posix()}
    declared = {d for d in deps if d.startswith("ece/")}
    assert not imported - declared, f"{name}: add to its deps in dvc.yaml: {sorted(imported - declared)}"
    assert not declared - imported, (
        f"{name}: not imported, remove from its deps in dvc.yaml: {sorted(declared - imported)}"
    )


def test_declared_artifacts_are_stage_outputs() -> None:
    """dvc.yaml's `artifacts:` (the edited model, the edit facts) name what a stage writes, with a type."""
    declared = yaml.safe_load((ROOT / "dvc.yaml").read_text())["artifacts"]
    outs = {next(iter(o)) if isinstance(o, dict) else o for s in STAGES.values() for o in s.get("outs", [])}
    assert {a["type"] for a in declared.values()} == {"model", "dataset"}
    for name, a in declared.items():
        assert any(a["path"] == o or a["path"].startswith(o + "/") for o in outs), (
            f"{name}: {a['path']} is no stage's output"
        )


@pytest.mark.parametrize("name", list(STAGES))
def test_stage_scripts_are_thin(name: str) -> None:
    """A stage script reads its params, calls the library, writes its outputs: at most 60 lines."""
    lines = script_of(STAGES[name]).read_text().splitlines()
    assert len(lines) <= 60, f"{name}: {len(lines)} lines; move the logic into ece/"
