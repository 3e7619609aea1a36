"""`python -m fpa_megatron.parallel.rendezvous_store --port P`: torchrun's c10d rendezvous store in a process
of its own.

With `--rdzv-backend c10d`, the agent that binds the endpoint's port hosts the store inside itself: when that
node is lost, every other agent fails with RendezvousConnectionError and the job cannot come back. Hosted
here instead (on the SLURM batch host, outside every agent: `launch/slurm.sbatch` does it; agents join with
`--rdzv-conf is_host=false`), the store outlives any node, so a lost node's agent can rejoin and torchrun
restarts the worker group (`--max-restarts`). Runs until SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import signal
import sys
from datetime import timedelta


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fpa_megatron.parallel.rendezvous_store",
                                     description="Host torchrun's c10d rendezvous store outside the agents.")
    parser.add_argument("--port", type=int, required=True, help="TCP port the agents' --rdzv-endpoint names")
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on (default: all)")
    args = parser.parse_args(argv)
    from torch.distributed import TCPStore

    stopped = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopped.append(True))
    store = TCPStore(args.host, args.port, is_master=True, wait_for_workers=False, timeout=timedelta(hours=1))
    print(f"rendezvous store listening on {args.host}:{args.port}", flush=True)
    while not stopped:
        signal.pause()
    del store
    return 0


if __name__ == "__main__":
    sys.exit(main())
