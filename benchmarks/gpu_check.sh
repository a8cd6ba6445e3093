#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py; `--plan` prints its stages' time limits, 7 minutes in all).
#
#   bash benchmarks/gpu_check.sh --bundle .gpu-bundle --output OUT   # a GPU node with no package index
#   bash benchmarks/gpu_check.sh --dry --output OUT                  # anywhere, a tiny model
#
# --bundle DIR (made by `make gpu-bundle`) installs the bundle's wheels with `pip install --no-index --no-deps`
# into a temporary folder, puts it and this repository on PYTHONPATH, points TLNLP_HOME at a copy of the
# bundle's data and declares the machine offline. Without it, the Python found here must have tlnlp's
# dependencies already (.venv/bin/python if there is one, else python3; PYTHON=... chooses another).
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-$( [ -x "$REPO/.venv/bin/python" ] && echo "$REPO/.venv/bin/python" || echo python3 )}

args=() bundle=""
while [ $# -gt 0 ]; do
  case "$1" in
    --bundle) bundle=${2:?--bundle needs a folder}; shift 2 ;;
    --bundle=*) bundle=${1#--bundle=}; shift ;;
    *) args+=("$1"); shift ;;
  esac
done

export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
if [ -n "$bundle" ]; then
  bundle=$(cd "$bundle" 2>/dev/null && pwd) || { echo "error: --bundle $bundle: no such folder (make one with \`make gpu-bundle\`)" >&2; exit 2; }
  [ -f "$bundle/manifest.json" ] || { echo "error: $bundle has no manifest.json: not a bundle made by \`make gpu-bundle\`" >&2; exit 2; }
  work=$(mktemp -d "${TMPDIR:-/tmp}/tlnlp-bundle.XXXXXX")
  trap 'rm -rf "$work"' EXIT
  "$PY" -m pip install --quiet --no-index --no-deps --disable-pip-version-check --target "$work/site" "$bundle"/wheels/*.whl
  export PYTHONPATH="$work/site:$PYTHONPATH"
  "$PY" -m tlnlp.bundle --verify "$bundle" >&2  # every file as the manifest lists it
  cp -r "$bundle/home" "$work/home"  # writable: runs cache their tokenized data there
  export TLNLP_HOME="$work/home"
  export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
  echo "gpu_check: installed $(ls "$bundle"/wheels | wc -l) wheels from $bundle into $work/site; TLNLP_HOME=$work/home (offline)" >&2
fi
"$PY" "$REPO/benchmarks/gpu_check.py" "${args[@]}"
