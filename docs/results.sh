#!/usr/bin/env bash
# Reproduce the tables of docs/RESULTS.md: DATA=digits|fashion-mnist bash docs/results.sh (from the repository root,
# with .venv made by `make demo` or `make test`). Runs are in-process (ray.enabled=false: no Ray Train start-up per
# stage); evaluation repeats and redundancy rows run as local Ray tasks.
set -euo pipefail
DATA=${DATA:-fashion-mnist}
PY=${PY:-.venv/bin/python}
METHODS=${METHODS:-"random dit mgd3 dds lgd"}
SEED_IPC=$($PY -c "from lgd_ray.config import load_config; print(load_config('$DATA').distill.seed_ipc)")
for m in $METHODS; do
  out=runs/results-$DATA-$m
  [ -f $out/report.md ] || $PY -m lgd_ray.distill $DATA distill.method=$m ray.enabled=false out=$out
  $PY -m lgd_ray.evaluate $out ipc=$SEED_IPC      # the seed increment only
  $PY -m lgd_ray.evaluate $out                    # the whole run
done
$PY -m lgd_ray.evaluate --full $DATA out=runs/results-$DATA-full repeats=${FULL_REPEATS:-3}
for m in dit lgd; do $PY -m lgd_ray.redundancy runs/results-$DATA-$m eval_every=1000; done
