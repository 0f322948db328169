#!/usr/bin/env bash
# FedMUD ablation (Li et al., ICML 2025, arXiv 2505.23176; shared/specs/fedmud.md §5):
# FedAvg, low-rank on weights (FedLMT), MUD + lowrank, MUD + BKD, MUD + BKD + AAD,
# all at ratio 1/32, on MNIST-1D and digits, IID and Dirichlet 0.3, 100 clients, 10 per round.
#
# The five variants differ in several keys at once (method, fedmud.target,
# fedmud.decomposition, fedmud.aggregation, lr), which is not a Cartesian
# product, so each cell is one `fedlr run` with a self-describing directory name.
#
# Usage: experiments/fedmud/run_ablation.sh [OUT_DIR] [extra fedlr --set arguments ...]
#   e.g. experiments/fedmud/run_ablation.sh results/fedmud-ablation --set rounds=100
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
OUT="${1:-results/fedmud-ablation}"
shift || true

# lr per variant (README.md, "Learning rates"): the best on MNIST-1D IID at 30
# rounds, lowered where it diverged on Dirichlet 0.3 within 100 rounds (FedAvg
# 2.0 -> 0.3, MUD + BKD 0.01 -> 0.005); MUD + lowrank follows MUD + BKD.
declare -A VARIANT=(
  [fedavg]="--set method=fedavg --set lr=0.3"
  [fedlmt]="--set fedmud.target=weight --set fedmud.decomposition=lowrank --set fedmud.aggregation=naive --set lr=0.3"
  [mud-lowrank]="--set fedmud.decomposition=lowrank --set fedmud.aggregation=naive --set fedmud.init_scale=2.5 --set lr=0.005"
  [mud-bkd]="--set fedmud.decomposition=bkd --set fedmud.aggregation=naive --set lr=0.005"
  [mud-bkd-aad]="--set fedmud.decomposition=bkd --set fedmud.aggregation=aad --set lr=0.005"
)
ORDER=(fedavg fedlmt mud-lowrank mud-bkd mud-bkd-aad)

for dataset in mnist1d digits; do
  for partition in iid dirichlet; do
    for variant in "${ORDER[@]}"; do
      run="$OUT/$dataset-$partition-$variant"
      echo "== $run" >&2
      # shellcheck disable=SC2086  # VARIANT holds several arguments on purpose
      fedlr run "$HERE/$dataset.toml" --set "partition=$partition" ${VARIANT[$variant]} "$@" \
        --out "$run" --force --quiet
    done
  done
done

fedlr report "$OUT" --plots "$OUT/plots"
