#!/usr/bin/env bash
# Reproduces the SASRec table of docs/models.md: CE and BCE (one sampled negative),
# seeds 0-4, trained with the 10-minute cap and evaluated on both leave-one-out
# protocols (full ranking, 100 uniform negatives; RecBole's and the paper's variants);
# then the table (lookalike study zoo-table --sasrec).
#   LOSSES="ce" SEEDS="3 4" docs/models/run_sasrec.sh
set -euo pipefail
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
SEEDS=${SEEDS:-"0 1 2 3 4"}
LOSSES=${LOSSES:-"ce bce"}
OUT=${OUT:-docs/models/runs-sasrec}
LOOKALIKE=${LOOKALIKE:-.venv/bin/lookalike}
PY=${PY:-.venv/bin/python}

for loss in $LOSSES; do
  for seed in $SEEDS; do
    dir="$OUT/sasrec-$loss/seed$seed"
    $LOOKALIKE train sasrec --set loss="$loss" --max-seconds 600 --seed "$seed" --threads 1 \
      --out "$dir"
    ckpt=$("$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['checkpoint'])" \
      "$dir/train.json")
    $LOOKALIKE evaluate sasrec --protocol all -k 10 --checkpoint "$ckpt" --out "$dir"
    rm -f "$dir"/*-per-user.npz
  done
done
"$(dirname "$PY")/lookalike" study zoo-table "$OUT" --sasrec
