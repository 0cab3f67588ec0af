#!/usr/bin/env bash
# Issue 44's IPC-10 schedule sweep, on run seed 0 only: LGD with guided stages inside 10 images per class, one run
# per schedule (seed increment + stages x increment = 10), each set scored by the protocol (3 fresh ConvNet-3, hard
# labels, 300 epochs). The schedule with the best mean is then fixed for every seed (docs/RESULTS.md). From the
# repository root; resumes (a scored schedule is skipped):
#   bash docs/ipc10_sweep.sh
set -euo pipefail
PY=${PY:-.venv/bin/python}
SET=(prior.train_steps=30000 prior.seed=0 prior.cfg_scale=1.5 seed=0 ray.enabled=false)
OUT=runs/ipc10-sweep
for schedule in "2 2 4" "4 2 3" "5 5 1"; do
  read -r seed_ipc per_stage stages <<< "$schedule"
  name=seed${seed_ipc}-${stages}x${per_stage}
  ls "$OUT/$name/eval/"*-hard.json >/dev/null 2>&1 && continue
  $PY -m lgd_ray.distill fashion-mnist "${SET[@]}" out=$OUT/$name distill.seed_ipc=$seed_ipc \
    distill.ipc_per_stage=$per_stage distill.stages=$stages --resume | grep -E "^distill: done|error"
  $PY -m lgd_ray.evaluate $OUT/$name ray.enabled=false evaluate.eval_every=1000 | tail -1  # last = the protocol's last
done
for f in "$OUT"/*/eval/*-hard.json; do
  $PY -c "import json, sys; r = json.load(open(sys.argv[1])); print(sys.argv[1].split('/')[2], r.get('last_mean'), r.get('last_std'))" "$f"
done
