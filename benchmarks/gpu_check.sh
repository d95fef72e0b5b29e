#!/usr/bin/env bash
# benchmarks/gpu.py on an offline GPU machine, from the project's root, once ../shared/gpu/prepare.sh has staged
# .gpu/ (the wheels fleetgen's dependencies lack there):   bash benchmarks/gpu_check.sh [gpu.py's options]
# Leaves in $OUT (default ./gpu_out) three files: gpu_check.log (everything printed), gpu_check.json and
# rank_logs.tar.gz (each launched job's rank logs and launcher stderr). Exit status: gpu.py's.
set -uo pipefail
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
{
  [ -f .gpu/setup.sh ] || { echo "no .gpu/setup.sh: run ../shared/gpu/prepare.sh here first"; exit 4; }
  bash .gpu/setup.sh && source /tmp/fleetgen-env.sh || exit 4
  nvidia-smi
  # its steps' budgets add up to 7 minutes; past 7.5 it writes what it has, and is killed a minute later
  timeout -k 60 450 python3 benchmarks/gpu.py --out "$OUT/gpu_check.json" "$@"
} 2>&1 | tee "$OUT/gpu_check.log"
status=${PIPESTATUS[0]}
if [ -d "$OUT/rank_logs" ]; then
  tar -czf "$OUT/rank_logs.tar.gz" -C "$OUT" rank_logs && rm -rf "$OUT/rank_logs"
fi
exit "$status"
