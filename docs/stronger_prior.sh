#!/usr/bin/env bash
# Issue 30: a stronger Fashion-MNIST prior, measured (issue 41: CONFIG=fashion-mnist-latent, the latent prior, the
# same steps). From the repository root, one step at a time (each resumes or skips what is done; in process):
#   bash docs/stronger_prior.sh fit [KEY=VALUE ...]    # the 30,000-step fit; its checkpoints kept in runs/prior30k/
#   bash docs/stronger_prior.sh curve [KEY=VALUE ...]  # fidelity along those checkpoints (every 2,500 steps)
#   bash docs/stronger_prior.sh sampling               # DDPM steps x CFG scale on the finished prior
#   bash docs/stronger_prior.sh dit10 CFG STEPS [KEY=VALUE ...]  # dit IPC 10 (3 fresh ConvNet-3) at that sampling
#   bash docs/stronger_prior.sh deep                   # the depth-8 variant at the 30,000 base steps' CPU time
#   bash docs/stronger_prior.sh keep [KEY=VALUE ...]   # the fitted VAE, the newest checkpoint, the curve's rows: docs/fit-state/
#     (docs/keep.sh: runs/ does not outlive a session here; `bash docs/keep.sh restore` before `fit` resumes the fit)
# KEY=VALUE: prior keys of a variant (e.g. prior.depth=8 prior.train_steps=14500); the default is the config's recipe.
# Writes runs/prior-CONFIG[-KEYS]/ (issue 30's record was made when this folder was runs/prior30k).
set -euo pipefail
PY=${PY:-.venv/bin/python}
STEP=$1; shift
[ "$STEP" = dit10 ] && { CFG=$1; N=$2; shift 2; }
CONFIG=${CONFIG:-fashion-mnist}
KEYS=(ray.enabled=false "$@")
TAG=$(echo "$*" | tr ' =' '_-'); OUT=runs/prior-$CONFIG${TAG:+-$TAG}
mkdir -p "$OUT/ckpts"
cache_dir() { $PY -c "import sys; from lgd_ray.config import load_config; from lgd_ray.prior import prior_checkpoints
print(prior_checkpoints(load_config(sys.argv[1], sys.argv[2:])).local_path)" "$CONFIG" "${KEYS[@]}"; }
ready() {  # the fit has finished (else `sampling` and `dit10` would start a second fit of the same prior)
  $PY -c "import sys; from lgd_ray.config import load_config; from lgd_ray.prior import PIPELINE_MARKER, prior_dir
sys.exit(not (prior_dir(load_config(sys.argv[1], sys.argv[2:])) / PIPELINE_MARKER).exists())" "$CONFIG" "${KEYS[@]}" \
    || { echo "the prior of ${KEYS[*]} is not made yet: run the fit step first" >&2; exit 2; }
}
case $STEP in
  fit)  # the fit deletes its checkpoints once the prior is saved: hard links keep every one of them for the curve
    CKPTS=$(cache_dir)
    (while sleep 30; do for d in "$CKPTS"/prior-*/checkpoint_*; do [ -d "$d" ] && cp -aln "$d" "$OUT/ckpts/"; done; done) &
    KEEP=$!
    $PY -m lgd_ray.prior $CONFIG "${KEYS[@]}" | tail -2
    kill $KEEP
    for d in "$CKPTS"/prior-*/checkpoint_*; do [ -d "$d" ] && cp -aln "$d" "$OUT/ckpts/"; done ;;
  curve)
    mapfile -t C < <(ls -d "$OUT"/ckpts/checkpoint_* | awk -F_ '($NF + 1) % 5 == 0')  # every 5th: 2,500 steps
    $PY bench/prior_curve.py $CONFIG "${C[@]}" "${KEYS[@]}" --out "$OUT/curve" --cfg-scale 1 ;;
  sampling)
    ready
    for n in 50 100 250; do
      $PY bench/prior_fidelity.py $CONFIG "${KEYS[@]}" prior.num_steps=$n --schedulers ddpm --cfg-scales 1 1.5 2 \
        | sed "s/^/steps $n: /" | tee -a "$OUT/sampling.txt"
    done ;;
  dit10)
    ready
    RUN=$OUT/dit10-cfg$CFG-steps$N
    ls "$RUN"/eval/*-ipc10-hard.json >/dev/null 2>&1 || {
      $PY -m lgd_ray.distill $CONFIG "${KEYS[@]}" distill.method=dit distill.stages=0 prior.cfg_scale=$CFG \
        prior.num_steps=$N out=$RUN --resume | grep -E "^distill: done|error"
      $PY -m lgd_ray.evaluate "$RUN" ray.enabled=false | tail -1; } ;;
  keep)  # the VAE (once fitted) and the DiT fit's newest checkpoint: what `fit` resumes from
    VAE=$($PY -c "import sys; from lgd_ray.config import load_config; from lgd_ray.vae_fit import vae_dir
print(vae_dir(load_config(sys.argv[1], sys.argv[2:])).local_path)" "$CONFIG" "${KEYS[@]}")
    VAE=$(realpath --relative-to=. "$VAE"); CKPTS=$(realpath --relative-to=. "$(cache_dir)")
    LAST=$(ls -d "$VAE-checkpoints"/vae-*/checkpoint_* "$CKPTS"/prior-*/checkpoint_* 2>/dev/null | grep -v '\.json$' \
      | awk -F/ '{print $NF, $0}' | sort -V | tail -1 | cut -d' ' -f2 || true)  # the highest round, in any run folder
    KEEP=(); [ -f "$VAE/vae_info.json" ] && KEEP+=("$VAE"); [ -n "$LAST" ] && KEEP+=("$LAST")
    [ -f "$OUT/curve/curve.json" ] && KEEP+=("$OUT/curve/curve.json")  # the curve's rows so far (its checkpoints go)
    [ ${#KEEP[@]} -gt 0 ] || { echo "nothing to keep yet" >&2; exit 2; }
    bash docs/keep.sh save "prior-$CONFIG${TAG:+-$TAG}" "${KEEP[@]}" ;;
  deep)
    exec bash "$0" fit prior.depth=8 prior.train_steps=14500 ;;
  *) echo "unknown step $STEP" >&2; exit 2 ;;
esac
