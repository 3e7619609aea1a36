#!/usr/bin/env bash
# Set up this machine and run the whole test suite (this is what CI runs).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# the SLURM tests (tests/slurm_cluster.py) run a real two-node cluster: slurm-wlm and munge, when root can install them
if [[ $EUID -eq 0 ]] && command -v apt-get >/dev/null && ! { command -v slurmctld && command -v munged; } >/dev/null; then
    echo "test.sh: installing slurm-wlm and munge for the SLURM tests" >&2
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        slurm-wlm munge) >/dev/null
fi
export OMP_NUM_THREADS=1
exec python3 -m pytest -q "$@"
