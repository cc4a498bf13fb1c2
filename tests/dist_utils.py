"""Run a test function in several processes on gloo (CPU).

Usage in a test::

    def _body(rank: int, world_size: int, tmp: str) -> None:
        ...  # torch.distributed is initialised here

    def test_something(tmp_path):
        run_distributed(_body, world_size=2, args=(str(tmp_path),))

The body must be a module-level function (it is pickled for spawn). An
exception in any rank fails the test with that rank's traceback.
"""

from __future__ import annotations

import os
import socket
import traceback
from collections.abc import Callable
from typing import Any

import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(
    rank: int,
    world_size: int,
    port: int,
    fn: Callable[..., None],
    args: tuple[Any, ...],
    errors: Any,
) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
    )
    import torch

    # Several ranks share 2 cores: one thread each avoids oversubscription.
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        fn(rank, world_size, *args)
    except BaseException:
        errors.put((rank, traceback.format_exc()))
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(
    fn: Callable[..., None], world_size: int, args: tuple[Any, ...] = (), timeout: float = 300
) -> None:
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    port = free_port()
    procs = [
        ctx.Process(target=_worker, args=(rank, world_size, port, fn, args, errors))
        for rank in range(world_size)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    for p in procs:
        if p.is_alive():
            p.kill()
    failures = []
    while not errors.empty():
        failures.append(errors.get())
    if failures:
        msgs = "\n".join(f"--- rank {rank} ---\n{tb}" for rank, tb in sorted(failures))
        raise AssertionError(f"distributed test failed:\n{msgs}")
    bad = [(i, p.exitcode) for i, p in enumerate(procs) if p.exitcode != 0]
    if bad:
        raise AssertionError(f"distributed test processes exited abnormally (rank, code): {bad}")
