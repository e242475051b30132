#!/usr/bin/env bash
# CUDA build check of the native extension fusednorm._C, on a machine without a GPU.
#
# 1. A separate virtual environment (default build/cuda-venv; never .venv) gets the registry's CUDA build of
#    torch (same version as .venv's torch). pip's config may carry find-links to a CPU wheel of the same
#    version, which would shadow it, so pip runs with PIP_CONFIG_FILE=/dev/null and no PIP_FIND_LINKS. To keep
#    the download small, torch is installed with --no-deps plus only the NVIDIA libraries that
#    libtorch_cuda.so links against (no Triton, cuSOLVER, CUPTI, NVTX or cuda-bindings).
# 2. The extension is built with nvcc ($CUDA_HOME, default /usr/local/cuda) for TORCH_CUDA_ARCH_LIST="8.0;9.0"
#    into build/cuda-ext (the in-place CPU build in fusednorm/ is left alone).
# 3. cuobjdump checks that the .so holds sm_80 AND sm_90 SASS for every CUDA kernel, and prints registers,
#    stack and spills (local memory) per kernel.
# 4. `import fusednorm._C` must load in Python without a GPU and report has_cuda() == True; the CPU ops of
#    that build must still run.
# Exit status non-zero on any failure.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT="$(pwd)"
START=$(date +%s)

VENV="${FUSEDNORM_CUDA_VENV:-$ROOT/build/cuda-venv}"
OUT="$ROOT/build/cuda-ext"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0}"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
HOST_PY="${PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$HOST_PY" ] || HOST_PY=python3
TORCH_VERSION="${FUSEDNORM_TORCH_VERSION:-$("$HOST_PY" -c 'import torch; print(torch.__version__.split("+")[0])' 2>/dev/null || echo 2.13.0)}"

log() { echo "[cuda-check $(($(date +%s) - START))s] $*"; }
fail() { echo "[cuda-check] FAIL: $*" >&2; exit 1; }

[ -x "$CUDA_HOME/bin/nvcc" ] || fail "nvcc not found at $CUDA_HOME/bin/nvcc (set CUDA_HOME)"
NVCC_VER="$("$CUDA_HOME/bin/nvcc" --version | sed -n 's/.*release \([0-9]*\.[0-9]*\).*/\1/p')"
log "nvcc $NVCC_VER at $CUDA_HOME; torch $TORCH_VERSION; TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST; MAX_JOBS=$MAX_JOBS"

# ---- 1. the CUDA build of torch in its own venv ---------------------------------------------------------
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV" || "$HOST_PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"
pip_registry() {
  # Ignore pip.conf (its find-links holds a CPU wheel that would win) and any find-links in the environment.
  env -u PIP_FIND_LINKS -u PIP_EXTRA_INDEX_URL PIP_CONFIG_FILE=/dev/null \
    "$VPY" -m pip --disable-pip-version-check -q "$@"
}
if ! "$VPY" -c "import torch, sys; sys.exit(0 if torch.version.cuda and torch.__version__.startswith('$TORCH_VERSION') else 1)" \
  >/dev/null 2>&1; then
  log "installing torch==$TORCH_VERSION (CUDA build from the registry) into $VENV"
  pip_registry install --no-deps "torch==$TORCH_VERSION"
  # The NVIDIA libraries libtorch_cuda.so needs to load, at the versions torch pins (read from its metadata).
  mapfile -t NV_REQS < <("$VPY" - <<'PY'
import re
from importlib.metadata import requires
keep = ("nvidia-cudnn", "nvidia-cusparselt", "nvidia-nccl", "nvidia-nvshmem")
toolkit_extras = {"cublas", "cudart", "cufft", "cufile", "curand", "cusparse", "nvjitlink", "nvrtc"}
for req in requires("torch") or []:
    spec = req.split(";")[0].strip()
    name = re.split(r"[\[<>=!~ ]", spec, maxsplit=1)[0]
    if name.startswith(keep):
        print(spec)
    elif name == "cuda-toolkit":
        version = spec.split("==")[1] if "==" in spec else ""
        print(f"cuda-toolkit[{','.join(sorted(toolkit_extras))}]" + (f"=={version}" if version else ""))
PY
)
  log "installing ${NV_REQS[*]}"
  pip_registry install "${NV_REQS[@]}" filelock "typing-extensions>=4.10" "sympy>=1.13.3" "networkx>=2.5.1" \
    jinja2 "fsspec>=0.8.5" numpy "setuptools>=77" wheel ninja
fi
"$VPY" -c "import torch; assert torch.version.cuda, 'not a CUDA build of torch'; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'cuda available:', torch.cuda.is_available())" \
  || fail "the CUDA build of torch does not import in $VENV"
TORCH_CUDA="$("$VPY" -c 'import torch; print(torch.version.cuda)')"
if [ "${TORCH_CUDA%%.*}" != "${NVCC_VER%%.*}" ]; then
  fail "torch was built with CUDA $TORCH_CUDA but nvcc is $NVCC_VER (major versions must match)"
fi
log "torch CUDA $TORCH_CUDA matches nvcc $NVCC_VER (major)"

# ---- 2. build --------------------------------------------------------------------------------------------
rm -rf "$OUT/lib"
mkdir -p "$OUT"
log "building fusednorm._C (CPU + CUDA)"
BUILD_LOG="$OUT/build.log"
if ! PATH="$VENV/bin:$PATH" "$VPY" setup.py build_ext -b "$OUT/lib" -t "$OUT/temp" >"$BUILD_LOG" 2>&1; then
  tail -50 "$BUILD_LOG"
  fail "build failed (full log: $BUILD_LOG)"
fi
SO="$(find "$OUT/lib" -name '_C*.so' | head -1)"
[ -n "$SO" ] || fail "no _C*.so produced"
grep -q "building CPU + CUDA kernels" "$BUILD_LOG" || fail "setup.py did not build the CUDA kernels (see $BUILD_LOG)"
# ptxas's spill reports; the nvcc command lines themselves (which pass -warn-spills) are not reports.
spill_lines() { grep -i "spill" "$BUILD_LOG" | grep -v -e "-warn-spills" -e " 0 bytes spill stores, 0 bytes spill loads"; }
if spill_lines | grep -q .; then
  spill_lines | sort -u | head -20
  log "WARNING: ptxas reported spills (above)"
fi
log "built $SO ($(du -h "$SO" | cut -f1))"

# ---- 3. cuobjdump: sm_80 and sm_90 code for every kernel -------------------------------------------------
CUOBJDUMP="${CUOBJDUMP:-}"
if [ -z "$CUOBJDUMP" ]; then
  for c in "$CUDA_HOME/bin/cuobjdump" "$ROOT"/.venv/lib/python3*/site-packages/triton/backends/nvidia/bin/cuobjdump \
    "$VENV"/lib/python3*/site-packages/nvidia/cu*/bin/cuobjdump; do
    if [ -x "$c" ]; then CUOBJDUMP="$c"; break; fi
  done
fi
if [ -z "$CUOBJDUMP" ]; then
  pip_registry install "nvidia-cuda-cuobjdump==${TORCH_CUDA}.*" || pip_registry install nvidia-cuda-cuobjdump
  CUOBJDUMP="$(find "$VENV" -name cuobjdump -type f | head -1)"
fi
[ -x "$CUOBJDUMP" ] || fail "cuobjdump not found"
log "cuobjdump: $CUOBJDUMP"
"$CUOBJDUMP" --dump-resource-usage "$SO" >"$OUT/resource_usage.txt" 2>&1 || fail "cuobjdump failed on $SO"
"$VPY" - "$OUT/resource_usage.txt" <<'PY' || fail "cuobjdump check failed"
import re
import subprocess
import sys

text = open(sys.argv[1]).read()
arch = None
current = None
usage = {}  # kernel -> arch -> {REG, STACK, SHARED, LOCAL} (a kernel instantiated in several .cu files keeps the max)
for line in text.splitlines():
    m = re.search(r"arch = (sm_\d+)", line)
    if m:
        arch, current = m.group(1), None
        continue
    m = re.match(r"\s*Function (\S+):", line)
    if m and arch:
        current = m.group(1)
        usage.setdefault(current, {}).setdefault(arch, {})
        continue
    if current and arch and re.match(r"\s*REG:", line):
        fields = {k: int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", line)}
        old = usage[current][arch]
        usage[current][arch] = {k: max(v, old.get(k, 0)) for k, v in fields.items()}
        current = None
if not usage:
    print(text[:3000])
    sys.exit("no CUDA kernels found in the .so")
names = {}
try:
    out = subprocess.run(["c++filt"], input="\n".join(usage), capture_output=True, text=True).stdout.splitlines()
    names = dict(zip(usage, out))
except OSError:
    pass
required = ("sm_80", "sm_90")
missing = [(k, a) for k in usage for a in required if not usage[k].get(a)]
expected = ("ln_fwd_kernel", "ln_bwd_kernel", "column_sum_kernel", "segment_reduce_kernel",
            "segment_finalize_kernel", "nc_elementwise_kernel")
absent = [e for e in expected if not any(e in k for k in usage)]
print(f"{'kernel':<100} {'arch':<6} {'REG':>4} {'STACK':>6} {'LOCAL':>6} {'SHARED':>7}")
spills = 0
for k in sorted(usage, key=lambda k: names.get(k, k)):
    for a in sorted(usage[k]):
        f = usage[k][a]
        short = names.get(k, k)
        short = short if len(short) <= 98 else short[:95] + "..."
        print(f"{short:<100} {a:<6} {f.get('REG', '?'):>4} {f.get('STACK', '?'):>6} {f.get('LOCAL', '?'):>6} "
              f"{f.get('SHARED', '?'):>7}")
        spills += int(f.get("LOCAL", 0)) > 0 or int(f.get("STACK", 0)) > 0
print(f"{len(usage)} kernels; archs per kernel: {sorted({a for k in usage for a in usage[k]})}; "
      f"kernel/arch pairs with stack or local memory (spills): {spills}")
if missing:
    sys.exit("kernels without code for a required arch: " + ", ".join(f"{names.get(k, k)} ({a})" for k, a in missing))
if absent:
    sys.exit("expected kernels not found: " + ", ".join(absent))
PY
log "every kernel has sm_80 and sm_90 code"

# ---- 4. import without a GPU -----------------------------------------------------------------------------
STAGE="$OUT/import-test"
rm -rf "$STAGE"
mkdir -p "$STAGE"
cp -r "$ROOT/fusednorm" "$STAGE/"
find "$STAGE/fusednorm" -name '_C*.so' -delete
cp "$SO" "$STAGE/fusednorm/"
(cd "$STAGE" && "$VPY" - <<'PY') || fail "import fusednorm._C failed in the CUDA venv"
import torch
import fusednorm._C  # noqa: F401
from fusednorm.backends import native
assert native.has_cuda(), "has_cuda() is False in the CUDA build"
x = torch.randn(3, 40)
y, mean, rstd = native.layer_norm_fwd(x, torch.ones(40), torch.zeros(40), 1e-5, False)
torch.testing.assert_close(y, torch.nn.functional.layer_norm(x, (40,)), rtol=1e-5, atol=1e-5)
print("import fusednorm._C ok: has_cuda =", native.has_cuda(), "| cuda device present:", torch.cuda.is_available(),
      "| CPU ops ok")
PY
log "PASS (wall time $(($(date +%s) - START)) s)"
