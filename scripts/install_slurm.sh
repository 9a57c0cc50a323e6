#!/usr/bin/env bash
# Installs what the Slurm end-to-end tests (tests/launch/test_slurm.py) start: Debian's slurmctld, slurmd, slurm-client
# and munge. The tests start the daemons themselves (no systemd, a private munge socket and config in a temporary
# folder, ports of their own), so nothing is configured or started here, and an already-installed Slurm is left
# alone. Needs root (or sudo) and apt; idempotent: does nothing when the binaries are already there.
#
# Usage: bash scripts/install_slurm.sh          (`make test` calls it, through its `slurm` target)
set -euo pipefail

need=()
for bin in slurmctld slurmd sbatch munged; do
  command -v "$bin" >/dev/null 2>&1 || need+=("$bin")
done
if [ ${#need[@]} -eq 0 ]; then
  echo "install_slurm: slurm and munge already installed ($(slurmd -V))"
  exit 0
fi

sudo=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null 2>&1 || { echo "install_slurm: need root or sudo to apt-get install" >&2; exit 1; }
  sudo="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
# policy-rc.d keeps the packages' init scripts from starting daemons with the stock config (exit 101 = not allowed)
policy=/usr/sbin/policy-rc.d
created_policy=0
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' | $sudo tee "$policy" >/dev/null
  $sudo chmod +x "$policy"
  created_policy=1
fi
cleanup() { if [ "$created_policy" = 1 ]; then $sudo rm -f "$policy"; fi; }
trap cleanup EXIT
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
echo "install_slurm: installed $(slurmd -V), munge $(munged -V 2>&1 | head -1)"
