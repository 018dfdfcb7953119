"""Which project modules a script runs, and one hash of their code.

Cache keys that stand for "the code" (the apply_edits checkpoint, the cached pre-edit evaluation) and
the code deps of every stage in dvc.yaml must cover each project module the script can reach. A
hand-written list goes stale the day someone adds an import; the import statements themselves,
read with `ast` (nothing is imported or run), cannot.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import yaml

from ece.data.io import sha256_file, sha256_json

PROJECT = Path(__file__).resolve().parents[2]  # the folder that holds the `ece` package


def _module_files(name: str, root: Path) -> list[Path]:
    """The project files that `import name` runs: each package's __init__.py on the way, then the module.

    Stops at the first part that is not a project package, so `ece.data.facts.Fact` (a class) gives
    ece/__init__.py, ece/data/__init__.py and ece/data/facts.py, and `torch.nn` gives nothing.
    """
    files: list[Path] = []
    folder = root
    for part in name.split("."):
        folder = folder / part
        if (folder / "__init__.py").is_file():
            files.append(folder / "__init__.py")
        else:
            if folder.with_suffix(".py").is_file():
                files.append(folder.with_suffix(".py"))
            break
    return files


def _imported_names(path: Path, root: Path) -> set[str]:
    """Every dotted name an import statement anywhere in `path` may load (function bodies included)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolved against the file's package inside the project
                package = path.resolve().relative_to(root).parent.parts
                package = package[: len(package) - node.level + 1]
                base = ".".join([*package, *([node.module] if node.module else [])])
            names.add(base)
            # `from a import b` loads a.b when b is a submodule
            names.update(f"{base}.{alias.name}" for alias in node.names if alias.name != "*")
    return names


def import_closure(module_path: str | Path, root: Path = PROJECT) -> list[Path]:
    """`module_path` and every module under `root` it imports, directly or transitively; sorted.

    Imports of anything not under `root` (the standard library, torch, ...) are left out.
    """
    start = Path(module_path).resolve()
    root = root.resolve()
    seen: set[Path] = set()
    todo = [start]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in _imported_names(path, root):
            todo.extend(f for f in _module_files(name, root) if f not in seen)
    return sorted(seen)


def code_hash(module_path: str | Path, root: Path = PROJECT) -> str:
    """sha256 of the code `module_path` runs (its import closure), independent of where it lies."""
    root = root.resolve()
    return sha256_json(
        {
            (f.relative_to(root).as_posix() if f.is_relative_to(root) else f.name): sha256_file(f)
            for f in import_closure(module_path, root)
        }
    )


def sync_dvc_deps(dvc_yaml: Path, root: Path = PROJECT) -> list[str]:
    """Rewrite the ece/ deps of every `python -m stages.<name>` stage in dvc.yaml to its script's import
    closure, leaving every other line (comments, data deps) as it is; the names of the stages changed.

    A new import then costs one command (`python -m ece.data.codehash`) instead of a hand edit that
    tests/pipeline/test_dvc_deps.py would otherwise have to catch.
    """
    lines = dvc_yaml.read_text(encoding="utf-8").splitlines(keepends=True)
    out: list[str] = []
    changed: list[str] = []
    script: str | None = None
    for line in lines:
        head = re.match(r"^  \w+:\s*$", line)
        cmd = re.match(r"^    cmd: python -m stages\.(\w+)\s*$", line)
        if head:
            script = None
        elif cmd:
            script = f"stages/{cmd.group(1)}.py"
        if script and re.match(rf"^      - {re.escape(script)}\s*$", line):
            out.append(line)
            closure = [p.relative_to(root).as_posix() for p in import_closure(root / script, root)]
            out.extend(f"      - {m}\n" for m in closure if m.startswith("ece/"))
            continue
        if script and re.match(r"^      - ece/\S+\.py\s*$", line):
            continue  # replaced by the closure written after the script line
        out.append(line)
    new = "".join(out)
    if new != "".join(lines):
        old_deps = _stage_deps("".join(lines))
        new_deps = _stage_deps(new)
        changed = sorted(s for s in new_deps if new_deps[s] != old_deps.get(s))
        dvc_yaml.write_text(new, encoding="utf-8")
    return changed


def _stage_deps(text: str) -> dict[str, list[str]]:
    stages = yaml.safe_load(text)["stages"]
    return {name: [d if isinstance(d, str) else next(iter(d)) for d in s.get("deps", [])] for name, s in stages.items()}


if __name__ == "__main__":
    touched = sync_dvc_deps(PROJECT / "dvc.yaml")
    print(f"dvc.yaml: ece/ deps rewritten for {', '.join(touched)}" if touched else "dvc.yaml: ece/ deps already exact")
