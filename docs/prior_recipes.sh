#!/usr/bin/env bash
# Prior recipes at a fixed training budget (issue 16): each recipe's prior is trained (cached in runs/cache) and
# measured by bench/prior_fidelity.py (the reference's accuracy on its samples, Fréchet distance and precision /
# recall in the reference's feature space; real train vs real test first, the floor). From the repository root:
#   bash docs/prior_recipes.sh digits 2000        # CONFIG STEPS [SCHEDULER CFG]
#   for s in 500 1000 3000; do RECIPES=base bash docs/prior_recipes.sh fashion-mnist $s ddpm 2; done  # vs budget
# Priors train in-process (ray.enabled=false) one after another, so their seconds are comparable.
set -euo pipefail
PY=${PY:-.venv/bin/python}
CONFIG=${1:-digits}; STEPS=${2:-2000}; SCHED=${3:-ddpm}; CFG=${4:-2}
RECIPES=${RECIPES:-}  # only these recipes (names as below); "" = all
recipe() {  # name, overrides...
  local name=$1; shift
  [ -n "$RECIPES" ] && [[ " $RECIPES " != *" $name "* ]] && return 0
  echo "== $CONFIG $name ($STEPS steps): $*"
  $PY -m lgd_ray.prior $CONFIG prior.train_steps=$STEPS "$@" ray.enabled=false | tail -2
  $PY bench/prior_fidelity.py $CONFIG prior.train_steps=$STEPS "$@" --schedulers $SCHED --cfg-scales $CFG
}
recipe base
recipe min-snr-5 prior.min_snr_gamma=5
recipe lr-2e-3 prior.lr=2e-3
recipe wide prior.head_dim=64
recipe deep prior.depth=8
recipe small-batch prior.batch_size=32 prior.train_steps=$((STEPS * 4))  # the same images in 4x the updates
recipe small-batch-min-snr-5 prior.batch_size=32 prior.train_steps=$((STEPS * 4)) prior.min_snr_gamma=5
