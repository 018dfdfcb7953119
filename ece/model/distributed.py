"""Data parallelism for the stages whose work is a sum over independent items: covariance (corpus chunks)
and evaluate (the forward batches of the facts' prompts).

`torchrun --nproc_per_node N -m stages.<name>` (or `srun` with torchrun's environment) starts N copies of
a stage. `start` joins them into one process group; each copy then computes the items i with
i % N == rank (`shard`), the partial results meet by `all_sum` (tensors zero outside a copy's own items,
so a sum adds each value to zeros only) or `from_rank` (one copy's result sent to all), and only rank 0
writes (`is_main`). The items are the same forward batches a single process runs, so every number is
computed exactly as there; only float64 sums over many copies (covariance) change their order.

Without a process group (plain `python -m stages.<name>`: no WORLD_SIZE) every function is the identity
of a single process, so outputs stay byte-identical to a run without this module.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Sequence
from typing import TypeVar

import torch.distributed as dist
from torch import Tensor

from ece.errors import EceError

T = TypeVar("T")


def start(n_items: int, unit: str, hint: str) -> None:
    """Join the process group torchrun describes in the environment (WORLD_SIZE, RANK, MASTER_ADDR,
    MASTER_PORT); refuse a world with more processes than `n_items` items of work before anything runs,
    since a copy without items would only make the result look parallel."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > n_items:
        raise EceError(f"{world} processes (WORLD_SIZE) for {n_items} {unit}: some would have nothing to do", hint)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group()  # no backend named: gloo for CPU tensors, nccl for CUDA ones where present
        atexit.register(dist.destroy_process_group)


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    """The copy that writes outputs and caches."""
    return rank() == 0


def shard(items: Sequence[T]) -> Sequence[T]:
    """This copy's items: every world_size-th from its rank on (interleaved, so items sorted by cost, as
    forward batches sorted by length are, spread evenly)."""
    return items[rank() :: world_size()]


def all_sum(t: Tensor) -> Tensor:
    """`t` summed over all copies, in place (and returned)."""
    if world_size() > 1:
        dist.all_reduce(t)
    return t


def from_rank(obj: T, src: int) -> T:
    """Copy `src`'s `obj` to every copy (any picklable value); the others' `obj` is ignored."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_objects(obj: T) -> list[T]:
    """Every copy's `obj` (any picklable value), in rank order; [obj] without a process group."""
    if world_size() == 1:
        return [obj]
    box: list[T | None] = [None] * world_size()
    dist.all_gather_object(box, obj)
    return box  # type: ignore[return-value]
