#!/usr/bin/env bash
# Issue 44's other protocols on the seeds tables' sets: soft labels (theta* as teacher), a second architecture
# (ResNetAP-10, hard labels) and the RDED protocol, at IPC 50 then 10, for every run folder given (default: the
# Fashion-MNIST seeds table's random, dit and lgd runs and the IPC-10 schedule's dit and lgd runs). At IPC 10 a run
# made for more images is evaluated only if it is `random` (a prefix of random real images is random real images;
# the other methods' IPC-10 sets are the schedule's runs). One fresh model per set (REPEATS, docs/RESULTS.md: the
# cost), tested at the last epoch only (evaluate.eval_every=1000: the protocol's last-epoch number). An evaluation
# whose result exists is skipped, so the script resumes. Then `python -m lgd_ray.report` pools each protocol over
# the seeds (one table per model and labels). From the repository root:
#   bash docs/protocols.sh                                    # the default runs
#   bash docs/protocols.sh runs/seeds-fashion-mnist/lgd/seed4 # these run folders only
#   ONLY="soft" IPCS="50" bash docs/protocols.sh              # one protocol, one IPC
set -euo pipefail
PY=${PY:-.venv/bin/python}
REPEATS=${REPEATS:-1}
read -r -a IPCS <<< "${IPCS:-50 10}"
ONLY=${ONLY:-}
RUNS=("$@")
[ ${#RUNS[@]} -gt 0 ] || RUNS=(runs/seeds-fashion-mnist/{random,dit,lgd}/seed* runs/ipc10-fashion-mnist/{dit,lgd}/seed*)
PROTOCOLS=(  # name: the result's file name part; keys
  "soft labels=soft"
  "resnetap10-hard model=resnetap10"
  "rded labels=rded"
)
# a run's method and IPC (its planned stages), from its manifest
about() { $PY -c "import sys; from lgd_ray.config import build_config; from lgd_ray.methods import stage_plan
from lgd_ray.shards import read_manifest; from lgd_ray.storage import as_location
cfg = build_config(read_manifest(as_location(sys.argv[1]))['config'])
print(cfg.distill.method, sum(s.ipc for s in stage_plan(cfg)))" "$1"; }
for ipc in "${IPCS[@]}"; do
  for p in "${PROTOCOLS[@]}"; do
    read -r name keys <<< "$p"
    [ -n "$ONLY" ] && [[ " $ONLY " != *" $name "* ]] && continue
    for run in "${RUNS[@]}"; do
      [ -f "$run/manifest.json" ] || continue
      model=convnet3; [[ $name == resnetap10-* ]] && model=resnetap10
      ls "$run/eval/$model-ipc$ipc-${name#resnetap10-}.json" >/dev/null 2>&1 && continue
      read -r method run_ipc <<< "$(about "$run")"
      [ "$run_ipc" -lt "$ipc" ] && continue
      [ "$run_ipc" -gt "$ipc" ] && [ "$method" != random ] && continue
      $PY -m lgd_ray.evaluate "$run" $keys ipc=$ipc repeats=$REPEATS eval_every=1000 ray.enabled=false | tail -1
    done
  done
done
$PY -m lgd_ray.report "${RUNS[@]}" | sed -n '/## Over run seeds/,$p'
