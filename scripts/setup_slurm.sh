#!/usr/bin/env bash
# Installs Debian's Slurm and munge (slurmctld, slurmd, slurm-client, munge) for the one-machine
# cluster test (tests/test_slurm_cluster.py, scripts/slurm/local_cluster.sh) when they are missing.
# Never fatal: where apt-get or root is not available, or the install fails, it says why and the
# test skips naming what is missing. Quiet when everything is already installed.
set -uo pipefail
installed() {
  local cmd
  for cmd in slurmctld slurmd sbatch srun munged; do command -v "$cmd" >/dev/null || return 1; done
}
installed && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
  echo "setup_slurm.sh: Slurm is not installed and this is not root with apt-get; its test will skip" >&2
  exit 0
fi
log=$(mktemp)
export DEBIAN_FRONTEND=noninteractive
if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge; } >"$log" 2>&1; then
  echo "setup_slurm.sh: installing Slurm failed; its test will skip. apt-get said:" >&2
  tail -n 5 "$log" >&2
fi
rm -f "$log"
exit 0
