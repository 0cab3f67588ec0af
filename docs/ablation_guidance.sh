#!/usr/bin/env bash
# The guidance-cost ablation in docs/RESULTS.md (issue 14): the exact LGD path against each cheaper option and
# their combination, on Fashion-MNIST with the table's prior (3000 steps, CFG 2: the default before issue 30),
# reference, seeds and protocol (IPC 50, 3 fresh ConvNet-3, 100 epochs). From the repository root, with .venv made
# by `make demo` or `make test`:
#   bash docs/ablation_guidance.sh
# Runs one after another in-process (ray.enabled=false), so each stage's sampling seconds are comparable; a stopped
# script continues where it stopped (--resume keeps finished chunks and stages).
set -euo pipefail
PY=${PY:-.venv/bin/python}
DISTILL=${DISTILL:-"-m lgd_ray.distill"}
run() {  # name, overrides...
  local out=runs/ablation-fashion-mnist-$1; shift
  $PY $DISTILL fashion-mnist prior.train_steps=3000 prior.cfg_scale=2.0 "$@" ray.enabled=false out=$out --resume
  ls $out/eval/*.json >/dev/null 2>&1 || $PY -m lgd_ray.evaluate $out
}
run exact
run every2 guidance.every=2
run select20 guidance.select_after=20
run every2-select20 guidance.every=2 guidance.select_after=20
run decoder guidance.through=decoder
run every2-select20-decoder guidance.every=2 guidance.select_after=20 guidance.through=decoder
# bf16 weights: this CPU has no bf16 units, so its bf16 GEMMs are done as a GPU's tensor cores do them
DISTILL="bench/bf16_emulated.py lgd_ray.distill" run bf16 prior.dtype=bfloat16
$PY -m lgd_ray.report runs/ablation-fashion-mnist-*
