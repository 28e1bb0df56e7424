#!/usr/bin/env bash
# Reproduces the general-CF table of docs/models.md: every model x seed trained and
# evaluated (ro-full, K=10) through the CLI, one torch thread, one process per stream;
# then the table and docs/models/general-cf-ml100k.json (lookalike study zoo-table).
#   SEEDS="0 1 2 3 4" docs/models/run.sh           (default: all models, seeds 0-4)
#   MODELS="ngcf lightgcn" SEEDS="0" docs/models/run.sh
# ncf-gmf and ncf-mlp run before neumf (NeuMF starts from their checkpoints, same seed).
set -euo pipefail
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
SEEDS=${SEEDS:-"0 1 2 3 4"}
MODELS=${MODELS:-"multvae multdae cdae ncf-gmf ncf-mlp neumf ngcf lightgcn autorec"}
OUT=${OUT:-docs/models/runs}
LOOKALIKE=${LOOKALIKE:-.venv/bin/lookalike}
PY=${PY:-.venv/bin/python}

# Settings chosen on validation NDCG@10 of the seed-0 split (docs/models.md).
settings() {  # $1 model, $2 seed
  local common="--max-seconds 600 --seed $2 --threads 1"
  case "$1" in
    multvae) echo "$common --lr 0.0005 --patience 20 --set batch_size=100 --set total_anneal_steps=2000 --set latent=128" ;;
    multdae) echo "$common --set batch_size=100" ;;
    cdae) echo "$common --patience 30 --epochs 1000" ;;
    ncf-gmf|ncf-mlp) echo "$common --lr 0.005 --set batch_size=1024" ;;
    neumf) echo "$common --set batch_size=1024 --set finetune_lr=0.005 \
      --set gmf_checkpoint=$(checkpoint ncf-gmf "$2") --set mlp_checkpoint=$(checkpoint ncf-mlp "$2")" ;;
    ngcf) echo "$common --lr 0.001 --epochs 1000 --set batch_size=2048 --set node_dropout=0.0 --set message_dropout=0.0" ;;
    lightgcn) echo "$common --lr 0.005 --epochs 1000" ;;
    autorec) echo "$common --patience 20 --epochs 1000 --set reg=100" ;;
    *) echo "unknown model $1" >&2; exit 2 ;;
  esac
}

checkpoint() {  # $1 model, $2 seed: the checkpoint its train.json names
  "$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['checkpoint'])" \
    "$OUT/$1/seed$2/train.json"
}

for seed in $SEEDS; do
  for model in $MODELS; do
    dir="$OUT/$model/seed$seed"
    # shellcheck disable=SC2046
    $LOOKALIKE train "$model" $(settings "$model" "$seed") --out "$dir"
    $LOOKALIKE evaluate "$model" --protocol ro-full -k 10 --checkpoint "$(checkpoint "$model" "$seed")" \
      --out "$dir"
    rm -f "$dir"/*-per-user.npz  # the CLI keeps them for intervals; too big for the docs
  done
done
# RECBOLE=../shared/peers/recbole-ml100k.md adds RecBole's rows to the printed table
"$(dirname "$PY")/lookalike" study zoo-table "$OUT" --json docs/models/general-cf-ml100k.json \
  ${RECBOLE:+--recbole "$RECBOLE"}
