#!/usr/bin/env bash
# FedSVD study (shared/specs/fedsvd.md §6, claims S1 and S2): FedAvg-LoRA, FFA-LoRA and
# FedSVD at epsilon 3, 6 and without privacy, on mnist1d.toml.
#
# "No privacy" is privacy.mechanism = none rather than a value of privacy.epsilon, so the
# study is two sweeps (the product method x epsilon, then method alone), both sequential.
#
# Usage: experiments/fedsvd/run.sh [OUT_DIR] [extra fedlr --set arguments ...]
#   e.g. experiments/fedsvd/run.sh results/fedsvd --set seed=1
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
OUT="${1:-results/fedsvd}"
shift || true

fedlr sweep "$HERE/mnist1d.toml" --grid method=fedavg-lora,ffa-lora,fedsvd --grid privacy.epsilon=3,6 \
  "$@" --out "$OUT/dpsgd" --quiet
fedlr sweep "$HERE/mnist1d.toml" --grid method=fedavg-lora,ffa-lora,fedsvd --set privacy.mechanism=none \
  "$@" --out "$OUT/none" --quiet

python "$HERE/table.py" "$OUT"
