#!/usr/bin/env bash
# NIID-Bench FedAvg on Fashion-MNIST, Dir(0.5): 10 clients, 50 rounds, E=10, B=64.
# Usage: experiments/fmnist_dirichlet/run.sh [extra overrides]
# Needs Fashion-MNIST IDX files: Debian's dataset-fashion-mnist, or data.root=/path.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${FEDTORCH_OUTPUT_DIR:-$here/outputs}"
python -m fedtorch.train +experiment=fmnist_dirichlet logger=quiet logger.plot=true \
  paths.output_dir="$out" hydra.run.dir="$out/run" "$@"
mkdir -p "$here/results"
cp "$out/run/"{metrics.csv,summary.json,metrics.png,config.yaml,partition.json} "$here/results/"
echo "results in $here/results"
