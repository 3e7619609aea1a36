"""`run_distributed(fn, world_size)`: run fn in real gloo processes (new ones each call), return each rank's result.
`run_measured(argv)`: a command as a child process, with its peak resident memory and wall time.

Used by the tests and benchmarks. Each rank gets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* in its environment,
OMP_NUM_THREADS=1, a gloo process group with a timeout, and a free port of its own. Warnings follow the
caller's filters in every rank (under pytest: setup.cfg's, so an "error" filter fails the rank), and the
ones a rank shows are raised again in the caller, so that pytest reports them like its own.

The ranks start from a fork server that has imported torch, Megatron-core and DeepSpeed once (the first call
starts it): a fresh interpreter importing them costs each rank seconds of CPU, which a suite of many spawns
paid again and again (4 ranks on 2 cores: ~15 s a spawn). The server imports only; nothing runs in it, so a
rank is a fresh process in every other respect, and it gets the caller's environment as it is at the call.
FPA_RUN_DISTRIBUTED_START=spawn starts each rank in a new interpreter instead (the default where CUDA is).
"""

from __future__ import annotations

import datetime
import io
import os
import pickle
import queue
import socket
import sys
import time
import traceback
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _picklable(obj) -> bool:
    try:
        pickle.dumps(obj)
        return True
    except Exception:  # noqa: BLE001 - e.g. a warning category defined inside a function
        return False


def _install_warning_filters(filters: list[tuple]) -> None:
    """Make `filters` (a copy of the caller's warnings.filters: compiled regexes and classes pickle) this
    process's warning filters, in the same order."""
    warnings.filters[:] = filters
    getattr(warnings, "_filters_mutated", lambda: None)()  # drop cached "already shown" decisions


def _module_of(filename: str) -> str:
    """Dotted module name of a source file on sys.path (what a filter's module field is matched against)."""
    path = os.path.abspath(filename)
    roots = sorted((os.path.abspath(p) for p in sys.path if p), key=len, reverse=True)
    for root in roots:
        if path.startswith(root + os.sep):
            name = os.path.splitext(os.path.relpath(path, root))[0].replace(os.sep, ".")
            return name.removesuffix(".__init__")
    return os.path.splitext(os.path.basename(path))[0]


# imported once by the fork server (what every rank needs first; a failed import is skipped by multiprocessing)
PRELOAD = ["torch", "torch.distributed", "megatron.core", "deepspeed", "fpa_megatron.training.trainer"]


def _context():
    # where CUDA is present, spawn: the server's imports may touch CUDA, and CUDA does not survive a fork
    method = os.environ.get("FPA_RUN_DISTRIBUTED_START", "spawn" if torch.cuda.is_available() else "forkserver")
    ctx = mp.get_context(method)
    if method == "forkserver":
        ctx.set_forkserver_preload(PRELOAD)
    return ctx


def _worker(rank: int, world_size: int, port: int, fn: Callable, args: tuple, results, timeout_s: float,
            warning_filters: list[tuple], environ: dict[str, str]):
    os.environ.clear()  # the caller's environment now, not the fork server's from when it started
    os.environ.update(environ)
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)
    try:
        with warnings.catch_warnings(record=True) as shown:
            _install_warning_filters(warning_filters)
            torch.distributed.init_process_group(
                "gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=timeout_s)
            )
            out = fn(*args)
        buffer = io.BytesIO()  # plain bytes: tensors shared through file descriptors die with the process
        torch.save(out, buffer)
        seen = [(str(w.message), w.category, w.filename, w.lineno) for w in shown]
        results.put((rank, "ok", buffer.getvalue(), seen))
    except BaseException:  # noqa: BLE001 - report every failure to the parent
        results.put((rank, "error", traceback.format_exc(), []))
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def run_distributed(fn: Callable, world_size: int, *args: Any, timeout_s: float = 300.0) -> list:
    """Spawn `world_size` gloo ranks running fn(*args); return [result of rank 0, rank 1, ...].

    fn must be importable (module level). Raises RuntimeError with the rank's traceback on failure, or naming
    the ranks whose process ended without reporting (e.g. "rank 1 died with exit code -9 (SIGKILL)").
    """
    ctx = _context()
    results = ctx.Queue()
    port = free_port()
    filters = [f for f in warnings.filters if _picklable(f)]
    procs = [
        ctx.Process(target=_worker, daemon=False,
                    args=(r, world_size, port, fn, args, results, timeout_s, filters, dict(os.environ)))
        for r in range(world_size)
    ]
    shown: dict[tuple, None] = {}  # the warnings the ranks showed, each once
    for p in procs:
        p.start()
    outputs: dict[int, Any] = {}
    errors: list[str] = []
    try:
        deadline = time.monotonic() + timeout_s
        while len(outputs) < world_size:
            try:
                rank, status, payload, rank_warnings = results.get(timeout=1.0)
            except queue.Empty:
                dead = [f"rank {r} died with exit code {p.exitcode}" + (" (SIGKILL)" if p.exitcode == -9 else "")
                        for r, p in enumerate(procs) if r not in outputs and p.exitcode not in (None, 0)]
                if dead:  # a rank that never reports (killed, or its process ended some other way)
                    errors.extend(dead)
                    break
                if time.monotonic() > deadline:
                    errors.append(f"timed out after {timeout_s}s waiting for ranks")
                    break
                continue
            shown.update(dict.fromkeys(rank_warnings))
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
    for message, category, filename, lineno in shown:
        warnings.warn_explicit(message, category, filename, lineno, module=_module_of(filename))
    if errors:
        raise RuntimeError("\n".join(errors))
    return [outputs[r] for r in range(world_size)]


@dataclass(frozen=True)
class Measured:
    """A command run as a child process: its exit status, wall time, peak resident memory and output."""

    returncode: int
    seconds: float
    peak_rss: int  # bytes: the largest resident set of the child (or of a child it waited for), mapped files included
    output: str


def run_measured(argv: list[str], env: dict | None = None, cwd: str | None = None) -> Measured:
    """Run `argv` and measure it: the kernel's own peak RSS of the child (`wait4`'s ru_maxrss, exact, no polling;
    pages of files it mapped count as they are touched) and the wall time; stdout and stderr together."""
    import subprocess
    import tempfile
    import time

    start = time.perf_counter()
    with tempfile.TemporaryFile() as out:
        child = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd)
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.perf_counter() - start
        out.seek(0)
        text = out.read().decode(errors="replace")
    return Measured(child.returncode, seconds, usage.ru_maxrss * 1024, text)  # ru_maxrss: KiB on Linux
