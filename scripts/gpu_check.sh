#!/usr/bin/env bash
# The real-size GPU check in one command, from a fresh copy of the tree (lisa_demo/gpu_check.py
# says what it measures). Writes OUT/gpu_check.json and OUT/gpu_check.txt (OUT: gpu_check/).
#
#   bash scripts/gpu_check.sh                # on a GPU machine (no CUDA: the tiny presets)
#   bash scripts/gpu_check.sh --cpu          # rehearsal on a CPU with the tiny presets
#   bash scripts/gpu_check.sh --prepare      # where there is network: wheels into .whl/
#
# A bare GPU machine may have torch, transformers, peft and accelerate but no bitsandbytes and
# no network: the missing packages install from the wheels in .whl/ (pinned as in
# requirements.txt; `--prepare` downloads them once, bitsandbytes' is about 41 MiB).
# Other arguments go to `python -m lisa_demo.gpu_check` (--out DIR, --repeats N, --timeout S).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
WHEELS=.whl

# module:package pairs the benchmark imports
NEEDED="torch:torch transformers:transformers peft:peft accelerate:accelerate
safetensors:safetensors numpy:numpy PIL:pillow cv2:opencv-python-headless
bitsandbytes:bitsandbytes"

pin() {  # the requirements.txt line of a package (with its version), or its bare name
  local line
  line=$(grep -E "^$1([=<>!~ ]|$)" requirements.txt | head -n 1 || true)
  echo "${line:-$1}"
}

if [ "${1:-}" = "--prepare" ]; then
  mkdir -p "$WHEELS"
  "$PYTHON" -m pip download --disable-pip-version-check --no-deps --only-binary=:all: \
    -d "$WHEELS" "$(pin bitsandbytes)" "$(pin opencv-python-headless)"
  ls -l "$WHEELS"
  exit 0
fi

absent() {  # the packages whose module cannot be found, in one interpreter (torch is slow)
  "$PYTHON" -c 'import importlib.util, sys
for pair in sys.argv[1].split():
    module, package = pair.split(":")
    if importlib.util.find_spec(module) is None:
        print(package)' "$NEEDED"
}

missing=()
for package in $(absent); do
  missing+=("$(pin "$package")")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "gpu_check: installing ${missing[*]}" >&2
  if ls "$WHEELS"/*.whl >/dev/null 2>&1; then  # offline, from the wheels beside the tree
    "$PYTHON" -m pip install -q --disable-pip-version-check --no-index --find-links "$WHEELS" \
      "${missing[@]}" || true
  fi
  still=()
  for package in $(absent); do still+=("$(pin "$package")"); done
  if [ "${#still[@]}" -gt 0 ]; then  # from the package index, where there is network
    "$PYTHON" -m pip install -q --disable-pip-version-check --retries 0 --timeout 10 \
      "${still[@]}" >/dev/null 2>&1 || true
  fi
  if [ -n "$(absent)" ]; then
    echo "error: missing $(absent | tr '\n' ' ')and no wheel for it in $WHEELS/: run" \
      "bash scripts/gpu_check.sh --prepare where there is network, and bring $WHEELS/ along" >&2
    exit 2
  fi
fi

export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false GRADIO_ANALYTICS_ENABLED=False
exec "$PYTHON" -m lisa_demo.gpu_check "$@"
