#!/usr/bin/env bash
# Run the experiments that are set up, then report them. From the repository root:
#   bash experiments/run.sh            # every experiment below
#   bash experiments/run.sh fra-study  # one
# Results (Parquet, PNGs, report.md) go to experiments/results/<experiment>/; see experiments/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."
want="${1:-all}"

if [[ "$want" == all || "$want" == fra-study ]]; then
  for split in balanced imbalanced; do
    fedsim run "experiments/fra-study/$split.yaml" --methods fra-lora,fedit,ffa-lora,fra-then-ffa --overwrite
    fedsim report "experiments/results/fra-study/$split"
  done
  python experiments/per_client.py experiments/results/fra-study > experiments/results/fra-study/per_client.md
fi
