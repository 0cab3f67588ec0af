#!/usr/bin/env bash
# Issue 17's table: each method and guidance variant over run seeds, evaluated by the protocol, pooled with paired
# differences by `python -m lgd_ray.report`. From the repository root:
#   bash docs/seeds_table.sh digits 0 1 2                  # CONFIG SEED...; runs in runs/seeds-CONFIG/VARIANT/seedN
#   ONLY="dit lgd" bash docs/seeds_table.sh digits 3 4     # only these variants
#   SET="prior.seed=0 distill.stages=1" bash docs/seeds_table.sh fashion-mnist 0 1 2   # overrides for every run
#   EVAL_IPC="10" ONLY="random dit" bash docs/seeds_table.sh fashion-mnist 0 1 2     # also evaluated at IPC 10
#     (at the seed IPC only the methods are: a guidance variant's seed increment is dit's and real-seed's is random's,
#     byte for byte, so their evaluations would repeat those)
#   REDUNDANCY="dit lgd" bash docs/seeds_table.sh fashion-mnist 0 1 2   # and these variants' increment redundancy
#   EVAL_SET="evaluate.eval_every=1000" ...   # overrides for every evaluation: here the test at the last epoch only
#     (the last accuracy is the same number, as training never depends on the tests; best is then the last)
#   OUT=runs/ipc10-fashion-mnist SET="distill.seed_ipc=4 distill.ipc_per_stage=2 distill.stages=3" ...  # another folder
#   ONLY="random dit lgd lgd-tiny" bash docs/seeds_table.sh fashion-mnist-latent 0 1 2  # issue 41: a latent prior's
#     guided step with the tiny guidance decoder beside the full one
# In-process (ray.enabled=false): one run at a time, so the seconds are comparable. The prior and the reference are
# trained once per seed (cached in runs/cache) and shared by every variant of that seed: the differences are paired.
set -euo pipefail
PY=${PY:-.venv/bin/python}
CONFIG=$1; shift; SEEDS=("$@")
ONLY=${ONLY:-}
read -r -a EVAL_IPC <<< "${EVAL_IPC:-}"
REDUNDANCY=${REDUNDANCY:-}
read -r -a SET <<< "${SET:-}"
read -r -a EVAL_SET <<< "${EVAL_SET:-}"
SEED_IPC=$($PY -c "import sys; from lgd_ray.config import load_config
print(load_config(sys.argv[1], sys.argv[2:]).distill.seed_ipc)" "$CONFIG" "${SET[@]}")
OUT=${OUT:-runs/seeds-$CONFIG}
VARIANTS=(
  "random distill.method=random"
  "dit distill.method=dit"
  "mgd3 distill.method=mgd3"
  "dds distill.method=dds"
  "real-seed distill.seed_from=real"
  "rank-only guidance.lambda=0"
  "gradient-only guidance.kappa=1"
  "lgd"
  "gradient-only-aug4 guidance.kappa=1 guidance.augment=4"
  "lgd-aug4 guidance.augment=4"
  "gradient-only-small guidance.kappa=1 guidance.lambda=0.02 guidance.through=decoder guidance.window=[0,45]"
  "lgd-small guidance.lambda=0.02 guidance.through=decoder guidance.window=[0,45]"
  "lgd-tiny guidance.decoder=tiny"
)
for v in "${VARIANTS[@]}"; do
  read -r name overrides <<< "$v"
  [ -n "$ONLY" ] && [[ " $ONLY " != *" $name "* ]] && continue
  evaluated() { ls "$OUT/$name/seed$1/eval/"*-hard.json >/dev/null 2>&1; }  # a finished run, evaluated
  todo=()
  for s in "${SEEDS[@]}"; do evaluated "$s" || todo+=("$s"); done
  if [ ${#todo[@]} -gt 0 ]; then
    echo "== $name: $overrides (seeds ${todo[*]})"
    said=$($PY -m lgd_ray.distill $CONFIG --seeds "$(IFS=,; echo "${todo[*]}")" out=$OUT/$name "${SET[@]}" $overrides \
      ray.enabled=false --resume 2>&1 | grep -E "^distill: done|error" || true)
    echo "$said"
    for s in "${todo[@]}"; do  # only finished runs: evaluate alone would take a stopped run's finished stages
      if grep -q "^distill: done.*/$name/seed$s\$" <<< "$said"; then
        $PY -m lgd_ray.evaluate $OUT/$name/seed$s ray.enabled=false "${EVAL_SET[@]}" | tail -1
      else
        echo "== $name seed $s: the distillation did not finish (above); not evaluated"
      fi
    done
  fi
  for ipc in "${EVAL_IPC[@]}"; do  # a prefix of the set (the seed increment at its seed_ipc)
    [ "$name" = dds ] && continue  # one increment: no prefix of stages
    [ "$ipc" = "$SEED_IPC" ] && [[ "$overrides" != *distill.method=* ]] && continue  # dit's or random's seed increment
    for s in "${SEEDS[@]}"; do
      evaluated "$s" || continue
      ls "$OUT/$name/seed$s/eval/"*-ipc$ipc-hard.json >/dev/null 2>&1 \
        || $PY -m lgd_ray.evaluate $OUT/$name/seed$s evaluate.ipc=$ipc ray.enabled=false "${EVAL_SET[@]}" | tail -1
    done
  done
  if [[ " $REDUNDANCY " == *" $name "* ]]; then
    for s in "${SEEDS[@]}"; do
      evaluated "$s" || continue
      [ -f "$OUT/$name/seed$s/redundancy/redundancy.json" ] \
        || $PY -m lgd_ray.redundancy $OUT/$name/seed$s ray.enabled=false | tail -1
    done
  fi
done
$PY -m lgd_ray.report "$OUT"/*/seed* > "$OUT/report.md"
sed -n '/## Over run seeds/,$p' "$OUT/report.md"
