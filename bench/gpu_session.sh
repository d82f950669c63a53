#!/usr/bin/env bash
# The GPU checks and benchmarks, in one command, for a session that is lent a GPU (one call of the
# device tool; about 15 minutes on one H100). From the repository root on the GPU machine:
#
#     bash bench/gpu_session.sh
#
# Each step's output goes to $OUT/<step>.log (the device tool brings $OUT back), or to ./gpu-results.
# The GPU image has PyTorch, transformers, tokenizers, safetensors and pytest but not FastAPI/uvicorn:
# for the serving step, download their wheels into .whl/ first (the device tool's README says how) and
# carry .whl. The tables go into BENCHMARKS.md by hand, with the machine and the date.
set -u -o pipefail
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl &&
        export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

step() {  # step NAME COMMAND...: run it, keep its log, carry on if it fails
    local name=$1
    shift
    echo "== $name: $*"
    "$@" 2>&1 | tee "$OUT/$name.log"
    echo "== $name: exit ${PIPESTATUS[0]}"
}

step gpu nvidia-smi
step tests python3 -m pytest -q -rs -p no:cacheprovider tests/gpu tests/model tests/infer
step train python3 bench/train_throughput.py --device cuda --presets nanogpt-cpu,gpt2-small
step decode python3 bench/decode.py --device cuda
if python3 -c "import fastapi, uvicorn" 2>/dev/null; then
    step serve python3 bench/serve_throughput.py --dtype bf16
else
    echo "== serve: skipped, FastAPI/uvicorn are not installed here (carry their wheels in .whl/, see the top)"
fi
