"""Experiments on DVC's own queue: every benchmark row is a `dvc exp run` with `-S` overrides.

    python bench/experiments.py add scale-cf-ece -S method=ece -S data.n_facts=2000   # queue one experiment
    python bench/experiments.py start [-j 1]        # run the queue in the background (DVC's workers)
    python bench/experiments.py wait                # block until the queue is empty; exit 1 if a run failed
    python bench/experiments.py results scale-      # metrics, curve, timings, params and overrides of finished experiments, as JSON
    ARGS=$(python bench/experiments.py args configs/llama3-8b.yaml model.name=/data/llama3) && dvc exp run $ARGS
                                                    # a model config (configs/*.yaml) as checked -S overrides

Queued experiments run in a temporary copy of the repository (.dvc/tmp/exps/), where dvc.yaml's
`python stages/...` must find this environment's interpreter: `start` puts the directory of the
Python that runs this script first on PATH (by absolute path) before DVC spawns its workers, so a
fresh clone's `.venv/bin/python bench/experiments.py start` works without activating anything, and
sets ECE_SCRATCH to this repository's .cache, so the queued runs share one machine-local scratch (a run
killed with its session resumes when queued again). Results stay
in the experiments (`dvc exp show`, `dvc exp apply NAME`); `results` reads them back from their git refs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from ece.config import load_params
from ece.errors import EceError

DVC = str(Path(sys.executable).with_name("dvc"))
PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"


def env() -> dict[str, str]:
    """What queued runs need, by absolute path, since they run in another folder: this interpreter's bin
    directory first on PATH, and this repository's .cache as the machine-local scratch (ECE_SCRATCH), so
    every experiment shares the z batches, the unedited model's evaluation and the apply_edits checkpoints."""
    path = f"{Path(sys.executable).parent.resolve()}{os.pathsep}{os.environ.get('PATH', '')}"
    scratch = os.environ.get("ECE_SCRATCH") or str(Path.cwd().resolve() / ".cache")
    return {**os.environ, "PATH": path, "ECE_SCRATCH": scratch, "DVC_NO_ANALYTICS": "1"}


def dvc(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([DVC, *args], env=env(), capture_output=True, text=True)
    if check and result.returncode != 0:
        raise SystemExit(f"dvc {' '.join(args)} failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}")
    return result


def add(name: str, overrides: list[str]) -> None:
    """Queue one experiment; an existing one of the same name is replaced (its results dropped)."""
    dvc("exp", "remove", name, check=False)
    dvc("exp", "run", "--queue", "-n", name, *[a for o in overrides for a in ("-S", o)])


def _override_value(value: Any) -> str:
    """A YAML value as `dvc exp run -S` and OmegaConf's dotlist both read it: lists without spaces (so
    that `$(…)` keeps one override one word), booleans and null in YAML's spelling."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, list):
        return "[" + ",".join(_override_value(v) for v in value) + "]"
    return str(value)


def read_overrides(path: str | Path) -> list[str]:
    """The `key=value` overrides of a model config (configs/*.yaml: dotted param names → values). Here,
    not in ece.config: every stage depends on that file, so a change there would rerun every stage.
    Unknown keys and bad values are left to `load_params`, which names them."""
    path = Path(path)
    if not path.exists():
        raise EceError(f"config file not found: {path}", "name one of the files in configs/")
    loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(loaded, dict) or not all(isinstance(k, str) and "." in k for k in loaded):
        raise EceError(
            f"{path} is not a mapping of dotted param names to values",
            "write one `section.key: value` per line, e.g. `edit.layers: [4, 5, 6, 7, 8]`",
        )
    return [f"{key}={_override_value(value)}" for key, value in loaded.items()]


def config_args(path: str, extra: list[str]) -> list[str]:
    """`-S key=value` for each override of the model config `path`, then of `extra` (`key=value`; one for a
    key the file sets replaces it there), validated against params.yaml first so that a typo fails here
    instead of in a queued run. Refuses whitespace: `$(…)` would split that override in two."""
    bare = [o for o in extra if "=" not in o]
    if bare:
        raise EceError(f"not key=value: {bare}", "write e.g. model.name=/path/to/the/model")
    merged = dict(o.split("=", 1) for o in [*read_overrides(path), *extra])
    overrides = [f"{key}={value}" for key, value in merged.items()]
    load_params(PARAMS, overrides)
    spaced = [o for o in overrides if any(c.isspace() for c in o)]
    if spaced:
        raise EceError(f"overrides with whitespace: {spaced}", "pass such a value as its own -S after the $(...)")
    return [a for o in overrides for a in ("-S", o)]


def queue(planned: dict[str, list[str]]) -> None:
    """Queue one experiment per name (replacing any of that name), saying what each runs with. Every set of
    overrides is checked against params.yaml first, so a typo fails here with nothing queued, not in a run
    an hour later."""
    try:
        for overrides in planned.values():
            load_params(PARAMS, overrides)
    except EceError as err:
        raise SystemExit(f"error: {err}") from None
    for name, overrides in planned.items():
        add(name, overrides)
        print(f"queued {name}: {' '.join(overrides)}")


def start(jobs: int = 1) -> None:
    """Start DVC's queue workers (they run detached and outlive this process; a worker already running
    is not started twice)."""
    dvc("queue", "start", "-j", str(jobs))
    print("started; `dvc queue status` shows progress, `dvc queue logs <name>` a run's output")


def queue_state() -> dict[str, list[str]]:
    """Experiment names by queue state (Queued, Running, Success, Failed), from `dvc queue status`."""
    states: dict[str, list[str]] = {}
    for line in dvc("queue", "status").stdout.splitlines()[1:]:
        parts = line.split()
        if len(parts) >= 4 and parts[-1] in {"Queued", "Running", "Success", "Failed"}:
            states.setdefault(parts[-1], []).append(parts[1])
    return states


def wait(poll_s: float = 10.0) -> dict[str, list[str]]:
    while True:
        states = queue_state()
        if not states.get("Queued") and not states.get("Running"):
            return states
        time.sleep(poll_s)


def experiments() -> dict[str, str]:
    """name → git revision of every finished experiment, whatever commit it was queued from (the latest
    one of a name). A queued or running experiment is left out: until it finishes, its revision holds
    the workspace it was queued with, not its results."""
    shown = json.loads(dvc("exp", "show", "--json", "--all-commits").stdout or "[]")
    found: dict[str, tuple[str, str]] = {}
    for baseline in shown:
        for exp in baseline.get("experiments") or []:
            if (exp.get("executor") or {}).get("state") not in (None, "success"):
                continue
            for rev in exp.get("revs") or []:
                stamp = (rev.get("data") or {}).get("timestamp") or ""
                if rev.get("name") and stamp >= found.get(rev["name"], ("", ""))[1]:
                    found[rev["name"]] = (rev["rev"], stamp)
    return {name: rev for name, (rev, _) in found.items()}


def read_at(rev: str, path: str) -> Any:
    """A JSON or YAML file as the experiment's commit holds it (None if it has none)."""
    shown = subprocess.run(["git", "show", f"{rev}:{path}"], capture_output=True, text=True)
    return yaml.safe_load(shown.stdout) if shown.returncode == 0 else None


def flatten(params: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested params as dotted names → values (lists are values, as `-S` sets them)."""
    flat: dict[str, Any] = {}
    for key, value in params.items():
        if isinstance(value, dict):
            flat |= flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def changed_params(base: dict[str, Any], run: dict[str, Any]) -> list[str]:
    """The `key=value` overrides that turn params `base` into `run`, in `run`'s order."""
    before = flatten(base)
    return [
        f"{key}={_override_value(value)}"
        for key, value in flatten(run).items()
        if key not in before or before[key] != value
    ]


def overrides(rev: str) -> list[str]:
    """What an experiment ran with, read back from git rather than from a note kept beside it: its
    params.yaml against that of the commit it was queued from (an experiment commit's parent)."""
    return changed_params(read_at(f"{rev}^", "params.yaml") or {}, read_at(rev, "params.yaml") or {})


def read_output(rev: str, path: str) -> bytes | None:
    """A DVC-tracked output (e.g. artifacts/z/index.parquet) as the experiment produced it, from this
    machine's DVC cache; None when the cache no longer holds it."""
    import dvc.api  # here: only reports that read outputs pay for importing DVC

    try:
        with dvc.api.open(path, rev=rev, mode="rb") as f:
            return f.read()
    except Exception:  # DVC raises several types for a missing or garbage-collected output
        return None


def required_output(rev: str, path: str, what: str, hint: str) -> bytes:
    """`read_output` for a report that cannot go on without it: exits naming `what` (the run) and `hint`
    (how to get the output back) when this machine's DVC cache no longer holds it."""
    data = read_output(rev, path)
    if data is None:
        raise SystemExit(f"{what}: {path} is not in this machine's DVC cache ({hint})")
    return data


def results(prefix: str = "") -> dict[str, dict[str, Any]]:
    """metrics.json, curve.json, timings.json, ledger_runs.json (per-batch run facts), params.yaml and the
    overrides of every finished experiment whose name starts with `prefix`."""
    return {
        name: {
            "rev": rev,
            "overrides": overrides(rev),
            "metrics": read_at(rev, "reports/metrics.json"),
            "curve": read_at(rev, "reports/curve.json"),
            "timings": read_at(rev, "reports/timings.json"),
            "runs": read_at(rev, "reports/ledger_runs.json"),
            "params": read_at(rev, "params.yaml"),
        }
        for name, rev in sorted(experiments().items())
        if name.startswith(prefix)
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("add", help="queue one experiment")
    a.add_argument("name")
    a.add_argument("-S", "--set-param", action="append", default=[], dest="overrides", help="a.b=value")
    s = sub.add_parser("start", help="run the queue in the background")
    s.add_argument("-j", "--jobs", type=int, default=1, help="parallel runs (1 on a 2-core machine)")
    sub.add_parser("wait", help="wait until the queue is empty")
    c = sub.add_parser("args", help="print a model config's -S overrides, checked against params.yaml")
    c.add_argument("config", help="configs/<model>.yaml")
    c.add_argument("extra", nargs="*", help="more key=value overrides, e.g. model.name=/path/to/the/model")
    r = sub.add_parser("results", help="finished experiments' metrics as JSON")
    r.add_argument("prefix", nargs="?", default="")
    args = ap.parse_args()
    if args.cmd == "add":
        queue({args.name: args.overrides})
    elif args.cmd == "args":
        try:
            print(" ".join(config_args(args.config, args.extra)))
        except EceError as err:
            raise SystemExit(f"error: {err}") from None
    elif args.cmd == "start":
        start(args.jobs)
    elif args.cmd == "wait":
        states = wait()
        print(json.dumps(states))
        sys.exit(1 if states.get("Failed") else 0)
    else:
        print(json.dumps(results(args.prefix), indent=2))


if __name__ == "__main__":
    main()
