#!/usr/bin/env bash
# The commands behind docs/RESULTS.md: DATA=digits|fashion-mnist bash docs/results.sh (from the repository root,
# with .venv made by `make demo` or `make test`). Distillation runs in-process (ray.enabled=false: no Ray Train
# start-up per stage); evaluate and redundancy inherit the run's config, so they run in-process too.
# random, mgd3 and dds images do not depend on the incremental student: on Fashion-MNIST their runs train it for
# 10 epochs a stage (only the report's per-stage curve uses it), to save CPU time. Fashion-MNIST's runs here use
# the 3000-step prior at CFG 2, the default before issue 30 (its over-seeds table: docs/seeds_table.sh).
set -euo pipefail
DATA=${DATA:-fashion-mnist}
PY=${PY:-.venv/bin/python}
METHODS=${METHODS:-"dit lgd random mgd3 dds"}
SEED_IPC=$($PY -c "from lgd_ray.config import load_config; print(load_config('$DATA').distill.seed_ipc)")
SHORT_STUDENT=""; PRIOR=""
if [ "$DATA" = fashion-mnist ]; then
  SHORT_STUDENT="student.train.epochs=10"; PRIOR="prior.train_steps=3000 prior.cfg_scale=2.0"
fi
for m in $METHODS; do
  out=runs/results-$DATA-$m
  extra=""
  case $m in random|mgd3|dds) extra=$SHORT_STUDENT ;; esac
  [ -f $out/report.md ] || $PY -m lgd_ray.distill $DATA distill.method=$m $PRIOR $extra ray.enabled=false out=$out
  # the seed increment alone (lgd's is the dit seed increment, bit for bit; dds has one increment)
  case $m in random|dit|mgd3) $PY -m lgd_ray.evaluate $out ipc=$SEED_IPC ;; esac
  $PY -m lgd_ray.evaluate $out
done
for m in dit lgd; do $PY -m lgd_ray.redundancy runs/results-$DATA-$m eval_every=1000; done
$PY -m lgd_ray.evaluate --full $DATA out=runs/results-$DATA-full repeats=${FULL_REPEATS:-3}
$PY -m lgd_ray.report runs/results-$DATA-*
