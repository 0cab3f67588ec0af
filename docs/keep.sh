#!/usr/bin/env bash
# This workplace lays the work tree anew between sessions, runs/ with it: a computation of several sessions resumes
# from run state committed before the stop. From the repository root:
#   bash docs/keep.sh save NAME PATH...   # PATH... (folders or files under runs/) into docs/fit-state/NAME.tar.gz
#   bash docs/keep.sh restore             # every docs/fit-state/*.tar.gz back into runs/ (files already there are kept)
#   EXCLUDE="*/student.safetensors" bash docs/keep.sh save NAME RUN...   # without files matching these patterns
#     (evaluated runs only: evaluate and report do not read them, but `distill --resume` trains a missing one again)
# Keep only what a resume reads (a fit's newest checkpoint, a cached reference, a run folder): each save adds its size
# (tens of MB) to git history, so keep only what the next session cannot make again cheaply.
set -euo pipefail
KEPT=docs/fit-state
case ${1:-} in
  save)
    NAME=$2; shift 2
    for p in "$@"; do [[ "$p" == runs/* && -e "$p" ]] || { echo "keep: $p is not a path under runs/" >&2; exit 2; }; done
    mkdir -p "$KEPT"
    read -r -a PATTERNS <<< "${EXCLUDE:-}"
    tar -czf "$KEPT/$NAME.tar.gz" "${PATTERNS[@]/#/--exclude=}" "$@"
    du -h "$KEPT/$NAME.tar.gz" ;;
  restore)
    for t in "$KEPT"/*.tar.gz; do
      [ -e "$t" ] || continue
      tar -xzf "$t" --skip-old-files
      echo "keep: restored $t"
    done ;;
  *) echo "usage: bash docs/keep.sh save NAME PATH... | restore" >&2; exit 2 ;;
esac
