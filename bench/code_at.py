"""Run a script of this tree with some of its modules as they were at a git revision.

    python bench/code_at.py REV ece/editing/zvec.py [more files] -- SCRIPT [ARGS]

For benchmark rows that measure old code against new in the same run (bench/z_design.py --grid
loop): each file is read with `git show REV:FILE` and loaded as its module (ece/editing/zvec.py is
ece.editing.zvec) before SCRIPT runs, so every importer gets the old module and the rest of the
tree is this one; the comparison isolates exactly the files named.
"""

from __future__ import annotations

import importlib
import importlib.util
import runpy
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_at(rev: str, file: str, folder: Path) -> None:
    """Install `file` as of `rev` as its module; it must not have been imported yet."""
    name = file.removesuffix(".py").replace("/", ".")
    if name in sys.modules:
        raise SystemExit(f"{name} is already imported: name it before anything imports it")
    shown = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:{file}"], capture_output=True, text=True)
    if shown.returncode:
        raise SystemExit(f"git show {rev}:{file} failed: {shown.stderr.strip()}")
    path = folder / f"{name}.py"
    path.write_text(shown.stdout)
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    parent, _, child = name.rpartition(".")
    setattr(importlib.import_module(parent), child, module)


def main() -> None:
    args = sys.argv[1:]
    if "--" not in args or args.index("--") < 2 or args.index("--") == len(args) - 1:
        raise SystemExit(__doc__)
    split = args.index("--")
    rev, files, (script, *rest) = args[0], args[1:split], args[split + 1 :]
    sys.path.insert(0, str(ROOT))  # this tree's ece, not an installed copy
    sys.path.insert(0, str(Path(script).resolve().parent))  # as if SCRIPT had been run itself
    with tempfile.TemporaryDirectory() as tmp:
        for file in files:
            load_at(rev, file, Path(tmp))
        sys.argv = [script, *rest]
        runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
