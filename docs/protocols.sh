#!/usr/bin/env bash
# Issue 44's other protocols on the seeds tables' sets: soft labels (theta* as teacher), the RDED protocol and a second
# architecture (ResNetAP-10, hard labels), at IPC 50 and 10, for every run folder given (default: the Fashion-MNIST
# seeds table's random, dit and lgd runs). Each evaluation tests at the last epoch only (evaluate.eval_every=1000: the
# protocol's last-epoch number) and is skipped when its result exists, so the script resumes; IPC 50 first. Then
# `python -m lgd_ray.report` pools each protocol over the seeds (one table per model and labels). From the root:
#   bash docs/protocols.sh                                    # runs/seeds-fashion-mnist/{random,dit,lgd}/seed*
#   bash docs/protocols.sh runs/seeds-fashion-mnist/lgd/seed4 # these run folders only
set -euo pipefail
PY=${PY:-.venv/bin/python}
RUNS=("$@")
[ ${#RUNS[@]} -gt 0 ] || RUNS=(runs/seeds-fashion-mnist/{random,dit,lgd}/seed*)
PROTOCOLS=(  # name: the result's file name part; keys
  "soft labels=soft"
  "resnetap10-hard model=resnetap10"
  "rded labels=rded"
)
for ipc in 50 10; do
  for p in "${PROTOCOLS[@]}"; do
    read -r name keys <<< "$p"
    for run in "${RUNS[@]}"; do
      [ -f "$run/manifest.json" ] || continue
      [ $ipc = 10 ] && [[ $run == */lgd/* ]] && continue  # lgd's first 10 IPC are dit's seed increment, byte for byte
      model=convnet3; [[ $name == resnetap10-* ]] && model=resnetap10
      label=${name#resnetap10-}
      ls "$run/eval/$model-ipc$ipc-$label.json" >/dev/null 2>&1 && continue
      $PY -m lgd_ray.evaluate "$run" $keys ipc=$ipc eval_every=1000 ray.enabled=false | tail -1
    done
  done
done
$PY -m lgd_ray.report "${RUNS[@]}" | sed -n '/## Over run seeds/,$p'
