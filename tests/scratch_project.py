"""A scratch project on tiny-llama for the tests of apply_edits, the ledger, the CLI and the methods.

`base_project` runs prepare → precompute_z once per test session (in-process: the stage functions
themselves, ~seconds) and every caller gets its own copy, so tests may change files freely.
`method_project` is such a copy switched to another editing method, with the upstream stages that
read the changed params rerun (as `dvc repro` would).
"""

from __future__ import annotations

import contextlib
import json
import os
import runpy
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from ece.config import load_params

ROOT = Path(__file__).resolve().parents[1]
DVC = str(Path(sys.executable).with_name("dvc"))
UPSTREAM = ["prepare", "covariance", "attribute", "cluster", "precompute_z", "train_editor"]
FACTS = [
    {"id": f"f{i}", "subject": s, "prompt": p, "target_new": n, "target_true": t}
    for i, (s, p, n, t) in enumerate(
        [
            ("Paris", "{} is the capital of", "Italy", "France"),
            ("Danielle Darrieux", "The mother tongue of {} is", "English", "French"),
            ("Toko Yasuda", "{} plays the", "piano", "guitar"),
            ("Edwin of Northumbria", "The official religion of {} is", "Islam", "Christianity"),
            ("Autonomous University of Madrid", "{}, which is located in", "Sweden", "Spain"),
            ("Lyon", "{} is a city in", "Germany", "France"),
        ]
    )
]
N_BATCHES = 3  # 6 facts, batch_size 2
# Training records for a trained editor (MEND): other facts than FACTS, each with a paraphrase and an
# unrelated prompt with its answer; ids train:100..train:107 (train_editor.id_range), the last 2 held out.
TRAIN = [
    {
        "id": f"train:{100 + i}",
        "subject": s,
        "prompt": "{} works in the city of",
        "target_new": o,
        "paraphrase_prompts": [f"The workplace of {s} is the city of"],
        "neighborhood_prompts": ["Ravi Shankar works in the city of"],
        "neighborhood_target": "Delhi",
    }
    for i, (s, o) in enumerate(
        [("Anna Berg", "Oslo"), ("Tom Hale", "Lima"), ("Kim Soo", "Seoul"), ("Joe Park", "Kyiv")]
        + [("Sue Lane", "Bern"), ("Max Ruiz", "Quito"), ("Lea Roth", "Graz"), ("Ida Holm", "Turku")]
    )
]
_BASE: dict[str, Path] = {}


@contextlib.contextmanager
def inside(folder: Path) -> Iterator[None]:
    old = Path.cwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(old)


def write_facts(work: Path, n: int = len(FACTS)) -> None:
    (work / "data/facts.jsonl").write_text("".join(json.dumps(f) + "\n" for f in FACTS[:n]))


def write_data(work: Path, n_facts: int = len(FACTS)) -> None:
    """The scratch inputs: the first `n_facts` facts, the training records of a trained editor, a small
    text corpus, no generation prompts, and four SST-2 examples for the general-ability part of `evaluate`."""
    (work / "data/general").mkdir(parents=True, exist_ok=True)
    write_facts(work, n_facts)
    (work / "data/train.jsonl").write_text("".join(json.dumps(f) + "\n" for f in TRAIN))
    (work / "data/corpus.txt").write_text(
        "\n\n".join(f"Document {i} talks about cities and rivers." for i in range(50))
    )
    (work / "data/gen.json").write_text("[]")
    sst2 = json.loads((ROOT / "data/general/sst2.json").read_text())[:4]
    (work / "data/general/sst2.json").write_text(json.dumps(sst2))


def write_params(work: Path, changes: dict[str, dict] | None = None) -> None:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["model"]["name"] = "tiny-llama"
    params["edit"] = {"layers": [1, 2], "batch_size": 2}
    params["data"].update(
        edit_dataset="data/facts.jsonl", format="jsonl", generation_prompts="data/gen.json", n_facts=0
    )
    params["covariance"].update(corpus="data/corpus.txt", n_tokens=2000, seq_len=32)
    params["z"].update(shared_steps=2, instance_steps=1, n_context=2, context_length=3)
    params["train_editor"].update(
        data="data/train.jsonl", id_range=[100, 199], heldout=2, max_steps=4, eval_every=2, patience=0
    )
    params["mend"].update(layers=[2, 3], rank=8, accumulate=2)
    params["serac"].update(embed_layer=2, dim=8, batch_records=4)
    params["ultraedit"].update(layers=[2, 3])  # its own window, not edit.layers (as in params.yaml)
    params["evaluate"].update(
        batch_size=4,
        n_general=4,
        general_tasks=["sst2"],
        general_dir="data/general",
        ppl_corpus="data/corpus.txt",
        ppl_tokens=64,
        ppl_window=32,
        gen_per_fact=0,
        reference_corpus="data/corpus.txt",
        threads=1,
    )
    for section, values in (changes or {}).items():
        params[section].update(values)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def run_stage_inprocess(work: Path, stage: str) -> None:
    with inside(work):
        runpy.run_path(str(ROOT / "stages" / f"{stage}.py"))["main"](load_params("params.yaml"))


def run_stage_subprocess(
    work: Path, stage: str, env: dict[str, str] | None = None, **kw
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "stages" / f"{stage}.py")],
        cwd=work,
        env=stage_env(env),
        capture_output=True,
        text=True,
        **kw,
    )


def stage_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if k != "ECE_SCRATCH"}  # each scratch project its own .cache
    return {**base, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **(extra or {})}


def run_dvc(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """A command in a scratch DVC repo; dvc runs the stages as `python -m stages.<name>`, so this
    interpreter's venv comes first on PATH."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**stage_env(), "DVC_NO_ANALYTICS": "1", "PATH": path}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)


def dvc_repo(work: Path, n_facts: int) -> Path:
    """A scratch git + DVC repository with the project's code, dvc.yaml and tiny-llama params, after a
    full `dvc repro`: the one way the DVC tests build a pipeline to change."""
    for name in ("ece", "stages"):
        shutil.copytree(ROOT / name, work / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "dvc.yaml", work / "dvc.yaml")
    write_data(work, n_facts=n_facts)
    write_params(work)
    for cmd in (["git", "init", "-q"], [DVC, "init", "-q"]):
        assert run_dvc(cmd, work).returncode == 0
    result = run_dvc([DVC, "repro"], work)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return work


def base_project(factory: pytest.TempPathFactory, name: str) -> Path:
    """A fresh copy of a tiny-llama project with every artifact up to precompute_z."""
    if "base" not in _BASE:
        work = factory.mktemp("base_project")
        write_data(work)
        write_params(work)
        for stage in UPSTREAM:
            run_stage_inprocess(work, stage)
        _BASE["base"] = work
    copy = factory.mktemp(name)
    shutil.copytree(_BASE["base"], copy, dirs_exist_ok=True)
    return copy


def set_params(work: Path, values: dict[str, object]) -> None:
    """Set dotted keys of the project's params.yaml (`method`, `rome.layer`), keeping every other value."""
    params = yaml.safe_load((work / "params.yaml").read_text())
    for dotted, value in values.items():
        *sections, key = dotted.split(".")
        node = params
        for section in sections:
            node = node[section]
        node[key] = value
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def _param(params: dict, dotted: str) -> object:
    """The value of a dotted key (`rome.layer`) in a loaded params.yaml."""
    node: object = params
    for key in dotted.split("."):
        node = node[key]  # type: ignore[index]
    return node


def stages_reading(changed: set[str]) -> list[str]:
    """The UPSTREAM stages `dvc repro` reruns after the params `changed` (dotted keys) change: from the
    first whose dvc.yaml `params` name one of them (or a section holding it) to the end of UPSTREAM,
    since each later stage reads the outputs of the one before. Read from dvc.yaml, so the helper
    follows the pipeline instead of a list that could drift from it."""
    declared = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]

    def reads(stage: str) -> bool:
        return any(
            key == entry or key.startswith(entry + ".") or entry.startswith(key + ".")
            for entry in declared[stage].get("params", [])
            for key in changed
        )

    first = next((i for i, stage in enumerate(UPSTREAM) if reads(stage)), len(UPSTREAM))
    return UPSTREAM[first:]


def method_project(factory: pytest.TempPathFactory, name: str, values: dict[str, object]) -> Path:
    """A copy of `base_project` with the params `values` (dotted keys, e.g. {"method": "rome",
    "rome.layer": 2}) and every artifact up to precompute_z for them: the stages that read no changed
    param (for a method change: prepare, covariance, attribute) keep the base's outputs, as DVC keeps them."""
    work = base_project(factory, name)
    params = yaml.safe_load((work / "params.yaml").read_text())
    changed = {key for key, value in values.items() if _param(params, key) != value}
    set_params(work, values)
    for stage in stages_reading(changed):
        run_stage_inprocess(work, stage)
    return work
