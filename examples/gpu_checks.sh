#!/usr/bin/env bash
# The GPU checks as one prepared device run (issue 12): the CUDA-marked tests (every method under 16-mixed and
# bf16-mixed, FSDP on one device, no host syncs in training steps) and bench_throughput.py at batch 256 under
# bf16-mixed and 16-mixed. Outputs land in $OUT (the device tool's folder; default runs/gpu), dated.
#
# Prepare here, once (needs the package registry): `make gpu-wheels` puts into .whl/ the pure-Python wheels
# that the device's image lacks (Avalanche 0.6.0 and what it imports at import time, the CLI's jsonargparse,
# omegaconf). Then run there with `.whl` carried:  bash examples/gpu_checks.sh
# Overrides: PYTHON, ACCEL (gpu), BENCH_ARGS, TEST_TIMEOUT / BENCH_TIMEOUT (seconds).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu}
PY=${PYTHON:-python3}
ACCEL=${ACCEL:-gpu}
BENCH_ARGS=${BENCH_ARGS:---batch-size 256 --steps 100 --rounds 2}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "installing the carried wheels failed" >&2; exit 1; }
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# Avalanche imports wandb and GPUtil at import time (GPUtil has no wheel); this library never calls either.
for m in wandb GPUtil; do
    if ! $PY -c "import $m" 2>/dev/null; then
        mkdir -p /tmp/stubs/$m
        echo '"""Empty stand-in for the device run (examples/gpu_checks.sh): imported by Avalanche, never called."""' \
            > /tmp/stubs/$m/__init__.py
    fi
done
export PYTHONPATH=/tmp/stubs:$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
{
    echo "date: $(date -u +%Y-%m-%dT%H:%MZ)"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
    $PY -c "import torch, lightning, timm, transformers, avalanche; print('torch', torch.__version__, '| lightning', \
lightning.__version__, '| timm', timm.__version__, '| transformers', transformers.__version__, '| cuda', \
torch.cuda.is_available())"
    echo "code: $(git rev-parse --short HEAD 2>/dev/null || echo 'not a git checkout')"
} 2>&1 | tee "$OUT/machine.txt"
status=0
timeout "${TEST_TIMEOUT:-330}" $PY -m pytest -q -m gpu tests -p no:cacheprovider 2>&1 | tee "$OUT/tests.log" || status=1
for p in bf16-mixed 16-mixed; do
    # shellcheck disable=SC2086
    timeout "${BENCH_TIMEOUT:-120}" $PY examples/bench_throughput.py --accelerator "$ACCEL" --precision "$p" \
        $BENCH_ARGS --markdown "$OUT/throughput_$p.md" 2>&1 | tee "$OUT/throughput_$p.log" || status=1
done
exit $status
