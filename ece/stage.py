"""The shared entry point of every stage script: load params, run, turn EceError into a clean exit."""

from __future__ import annotations

import sys
from collections.abc import Callable

from ece.config import Params, load_params
from ece.errors import EceError


def run_stage(main: Callable[[Params], None], params_path: str = "params.yaml") -> None:
    """Run `main(params)`; a user-fixable error prints one readable message and exits with status 2."""
    try:
        main(load_params(params_path))
    except EceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
