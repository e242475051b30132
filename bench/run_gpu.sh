#!/usr/bin/env bash
# One-shot GPU run: the GPU test suite, then the default, llm and diffusion benchmark presets.
#
#   bash bench/run_gpu.sh OUTDIR [extra fusednorm-bench args...]     (PYTHON=... to pick the interpreter)
#
# Environment: PRESETS="default llm diffusion" (which presets, in order), SKIP_TESTS=1 (benchmarks only).
# The llm and diffusion presets take tens of minutes with torch.compile (it compiles every case); to split the
# work, run the presets in separate calls (PRESETS=llm SKIP_TESTS=1 ...) or leave torch.compile out with
# `--provider triton native torch liger apex flash_attn quack`.
#
# Writes into OUTDIR: nvidia-smi.txt, tests.txt + tests.xml (pytest tests -m "not slow" on the CUDA device),
# for each preset P in (default llm diffusion): P.txt (the table), P.csv, P.json (with device, versions, git
# commit), P.md and P.png; kernels.txt (register/spill report of the Triton kernels). Runs every step even
# when one fails; exits non-zero when any step failed (a FAILED correctness check included).
set -uo pipefail

out=${1:?usage: bash bench/run_gpu.sh OUTDIR [extra fusednorm-bench args]}
shift
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."

PY=${PYTHON:-python}
"$PY" - <<'EOF_PY' || exit 2
import sys
try:
    import torch
except ImportError as exc:
    sys.exit(f"run_gpu.sh: cannot import torch ({exc}); activate the environment or set PYTHON")
if not torch.cuda.is_available():
    sys.exit("run_gpu.sh: torch sees no CUDA device; nothing to do")
EOF_PY

status=0
nvidia-smi > "$out/nvidia-smi.txt" 2>&1 || true
"$PY" -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())" \
    > "$out/torch.txt" 2>&1 || true

# The test suite on the GPU: Triton compiles for the device instead of running in its interpreter
# (tests/conftest.py only sets TRITON_INTERPRET when it is unset), and FUSEDNORM_TEST_DEVICE asks the tests
# for CUDA tensors where they support choosing.
if [ "${SKIP_TESTS:-0}" != "1" ]; then
    TRITON_INTERPRET=0 FUSEDNORM_TEST_DEVICE=cuda "$PY" -m pytest tests -m "not slow" -q -p no:cacheprovider \
        --junitxml "$out/tests.xml" 2>&1 | tee "$out/tests.txt"
    [ "${PIPESTATUS[0]}" -eq 0 ] || { echo "run_gpu.sh: GPU test suite failed" >&2; status=1; }
fi

for preset in ${PRESETS:-default llm diffusion}; do
    echo "== fusednorm-bench --preset $preset" >&2
    "$PY" -m fusednorm.bench --preset "$preset" --device cuda --quiet \
        --csv "$out/$preset.csv" --json "$out/$preset.json" --md "$out/$preset.md" --plot "$out/$preset.png" \
        "$@" 2>&1 | tee "$out/$preset.txt"
    [ "${PIPESTATUS[0]}" -eq 0 ] || { echo "run_gpu.sh: preset $preset reported failures" >&2; status=1; }
done

"$PY" -m fusednorm.bench --kernels > "$out/kernels.txt" 2>&1 || true
echo "run_gpu.sh: results in $out (exit $status)" >&2
exit $status
