"""`run_distributed(fn, world_size)`: run fn in real gloo processes (spawned), return each rank's result.

Used by the tests and benchmarks. Each rank gets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* in its environment,
OMP_NUM_THREADS=1, a gloo process group with a timeout, and a free port of its own.
"""

from __future__ import annotations

import datetime
import io
import os
import queue
import socket
import traceback
from typing import Any, Callable

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, fn: Callable, args: tuple, results, timeout_s: float):
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)
    try:
        torch.distributed.init_process_group(
            "gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=timeout_s)
        )
        out = fn(*args)
        buffer = io.BytesIO()  # plain bytes: tensors shared through file descriptors die with the process
        torch.save(out, buffer)
        results.put((rank, "ok", buffer.getvalue()))
    except BaseException:  # noqa: BLE001 - report every failure to the parent
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def run_distributed(fn: Callable, world_size: int, *args: Any, timeout_s: float = 300.0) -> list:
    """Spawn `world_size` gloo ranks running fn(*args); return [result of rank 0, rank 1, ...].

    fn must be importable (module level). Raises RuntimeError with the rank's traceback on failure.
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_worker, args=(r, world_size, port, fn, args, results, timeout_s), daemon=False)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    outputs: dict[int, Any] = {}
    errors: list[str] = []
    try:
        for _ in range(world_size):
            try:
                rank, status, payload = results.get(timeout=timeout_s)
            except queue.Empty:
                errors.append(f"timed out after {timeout_s}s waiting for ranks")
                break
            if status == "ok":
                outputs[rank] = torch.load(io.BytesIO(payload), weights_only=False)
            else:
                errors.append(f"rank {rank} failed:\n{payload}")
                break
    finally:
        for p in procs:
            p.join(timeout=5 if not errors else 0.5)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    if errors:
        raise RuntimeError("\n".join(errors))
    return [outputs[r] for r in range(world_size)]
