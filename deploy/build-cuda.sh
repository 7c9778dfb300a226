#!/usr/bin/env bash
# Build greencode with `--features cuda` on a machine without a GPU.
#
# Everything CUDA comes from NVIDIA's CUDA 13.0 PyPI wheels, pip-installed into
# a scratch venv outside the repository; nothing is installed system-wide:
#   1. the wheels (nvcc, nvvm, crt headers, cudart, cccl, cuBLAS, cuRAND, NVRTC);
#   2. a CUDA_HOME folder of links into the wheels, with the unversioned
#      lib*.so links the linker needs (the wheels ship only lib*.so.N);
#   3. a libcuda stub (soname libcuda.so.1) defining every cu* function cudarc
#      names, for the linker only: the real driver library is loaded at run time;
#   4. cargo build --release --features cuda with CUDA_COMPUTE_CAP=90 (Hopper,
#      sm_90a PTX) and no `-C target-cpu=native`, into its own target dir;
#   5. a carry folder for the GPU machine: the stripped binary, xz-compressed
#      (the device tool carries at most 64 MiB with the repository), plus the
#      small runtime libraries; see benches/gpu/run.sh for how it runs there.
#
# Environment (all optional):
#   CUDA_VENV        scratch venv for the wheels     (/work/scratch/cuda-venv)
#   TARGET_DIR       cargo target dir                (<repo>/target-cuda)
#   CARRY_DIR        staged binary + libs            (<repo>/gpu-carry)
#   CUDA_COMPUTE_CAP GPU compute capability          (90)
#   CARGO_BUILD_JOBS parallel rustc/nvcc jobs        (2)
#   PYTHON           interpreter for the venv        (python3)
#   SKIP_BUILD=1     only prepare the toolchain (e.g. for `cargo clippy --features cuda`)
#
# To use the prepared toolchain in your own shell (clippy, tests):
#   source <(deploy/build-cuda.sh --print-env)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CUDA_VENV=${CUDA_VENV:-/work/scratch/cuda-venv}
TARGET_DIR=${TARGET_DIR:-$ROOT/target-cuda}
CARRY_DIR=${CARRY_DIR:-$ROOT/gpu-carry}
PYTHON=${PYTHON:-python3}
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
export CARGO_BUILD_JOBS=${CARGO_BUILD_JOBS:-2}

# The wheels REFERENCE.md records building candle-core 0.11.1 with `cuda`.
WHEELS=(
  nvidia-cuda-nvcc==13.0.88
  nvidia-nvvm==13.0.88
  nvidia-cuda-crt==13.0.88
  nvidia-cuda-runtime==13.0.88
  nvidia-cuda-cccl==13.0.85
  nvidia-cublas==13.0.2.14
  nvidia-curand==10.4.0.35
  nvidia-cuda-nvrtc==13.0.88
)
CUDA_HOME="$CUDA_VENV/cuda-home"

log() { printf '== %s\n' "$*" >&2; }

print_env() {
  printf 'export CUDA_HOME=%q\n' "$CUDA_HOME"
  printf 'export PATH=%q:"$PATH"\n' "$CUDA_HOME/bin"
  printf 'export CUDA_COMPUTE_CAP=%q\n' "$CUDA_COMPUTE_CAP"
  printf 'export LIBRARY_PATH=%q:"${LIBRARY_PATH:-}"\n' "$CUDA_HOME/lib:$CUDA_HOME/lib/stubs"
}

install_wheels() {
  local stamp="$CUDA_VENV/.greencode-wheels"
  if [[ -f $stamp && "$(cat "$stamp")" == "${WHEELS[*]}" ]]; then
    log "wheels already in $CUDA_VENV"
    return
  fi
  log "installing the CUDA 13.0 wheels into $CUDA_VENV"
  "$PYTHON" -m venv "$CUDA_VENV"
  "$CUDA_VENV/bin/python" -m pip install --quiet --disable-pip-version-check "${WHEELS[@]}"
  echo "${WHEELS[*]}" >"$stamp"
}

# The folder every wheel installs into: site-packages/nvidia/cu13.
wheel_root() {
  local root
  root=$("$CUDA_VENV/bin/python" - <<'EOF'
import pathlib, sysconfig
print(pathlib.Path(sysconfig.get_paths()["purelib"]) / "nvidia" / "cu13")
EOF
)
  [[ -x $root/bin/nvcc ]] || { echo "nvcc not found under $root" >&2; exit 1; }
  echo "$root"
}

make_cuda_home() {
  local cu=$1
  log "CUDA_HOME links in $CUDA_HOME"
  rm -rf "$CUDA_HOME"
  mkdir -p "$CUDA_HOME/lib/stubs"
  ln -s "$cu/bin" "$CUDA_HOME/bin"
  ln -s "$cu/include" "$CUDA_HOME/include"
  ln -s "$cu/nvvm" "$CUDA_HOME/nvvm"
  local lib so
  for lib in cublas cublasLt cudart curand nvrtc; do
    so=$(find "$cu/lib" -maxdepth 1 -name "lib$lib.so.*" | sort | head -1)
    [[ -n $so ]] || { echo "lib$lib.so.* missing under $cu/lib" >&2; exit 1; }
    ln -s "$so" "$CUDA_HOME/lib/lib$lib.so"
    ln -s "$so" "$CUDA_HOME/lib/$(basename "$so")"
  done
  # nvcc finds its version.json here; cudarc asks `nvcc --version` instead.
  [[ -f $cu/version.json ]] && ln -s "$cu/version.json" "$CUDA_HOME/version.json"
  return 0
}

# A link-time stand-in for the driver library: every cu* function cudarc's
# driver bindings declare, each returning CUDA_ERROR_STUB_LIBRARY (34). Only
# the linker sees it; the GPU machine loads its real libcuda.so.1.
make_libcuda_stub() {
  local sys
  sys=$(find "${CARGO_HOME:-$HOME/.cargo}/registry/src" -path '*/cudarc-0.19.*/src/driver/sys/mod.rs' | sort | tail -1)
  if [[ -z $sys ]]; then
    (cd "$ROOT" && cargo fetch --locked >/dev/null)
    sys=$(find "${CARGO_HOME:-$HOME/.cargo}/registry/src" -path '*/cudarc-0.19.*/src/driver/sys/mod.rs' | sort | tail -1)
  fi
  [[ -n $sys ]] || { echo "cudarc's driver/sys/mod.rs not found in the cargo registry" >&2; exit 1; }
  log "libcuda stub from $sys"
  local src="$CUDA_HOME/lib/stubs/libcuda_stub.c"
  grep -oE '\bfn cu[A-Za-z0-9_]+\(' "$sys" | sed -E 's/^fn (cu[A-Za-z0-9_]+)\($/\1/' | sort -u |
    awk '{ printf "int %s(void) { return 34; }\n", $1 }' >"$src"
  local n
  n=$(wc -l <"$src")
  ((n > 300)) || { echo "only $n cu* functions found in $sys" >&2; exit 1; }
  cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$CUDA_HOME/lib/stubs/libcuda.so" "$src"
  log "libcuda stub: $n functions"
}

build() {
  log "cargo build --release --features cuda (CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP, jobs $CARGO_BUILD_JOBS)"
  # A native CPU target would not run on the GPU machine's processor; strip the
  # carried binary (debug line tables are most of its non-PTX size).
  unset RUSTFLAGS CARGO_ENCODED_RUSTFLAGS
  local start end
  start=$(date +%s)
  (cd "$ROOT" && CARGO_PROFILE_RELEASE_DEBUG=false CARGO_PROFILE_RELEASE_STRIP=symbols \
    cargo build --release --locked --features cuda --target-dir "$TARGET_DIR" --bin greencode)
  end=$(date +%s)
  log "build took $((end - start)) s"
}

stage() {
  local cu=$1 bin="$TARGET_DIR/release/greencode"
  log "staging $CARRY_DIR"
  rm -rf "$CARRY_DIR"
  mkdir -p "$CARRY_DIR/lib"
  xz -T0 -9 -c "$bin" >"$CARRY_DIR/greencode.xz"
  # Small runtime libraries travel; cuBLAS (libcublasLt alone is ~500 MB) and
  # cuRAND are too large for the 64 MiB carry and are found on the GPU
  # machine instead (PyTorch's venv ships them: benches/gpu/run.sh).
  local so
  for so in "$cu"/lib/libcudart.so.13; do
    cp -L "$so" "$CARRY_DIR/lib/"
  done
  {
    local rev
    rev=$(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null) || rev=unknown
    (cd "$ROOT" && git diff --quiet HEAD 2>/dev/null) || rev+="+dirty"
    echo "built $(date -u +%FT%TZ) from $rev"
    echo "CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP"
    echo "binary bytes: $(stat -c %s "$bin")"
    echo "needs:"
    readelf -d "$bin" | awk '/NEEDED/ { gsub(/[][]/, "", $NF); print "  " $NF }'
    echo "newest glibc symbol: $(objdump -T "$bin" | grep -oE 'GLIBC_[0-9.]+' | sort -uV | tail -1)"
  } >"$CARRY_DIR/BUILD_INFO"
  cat "$CARRY_DIR/BUILD_INFO" >&2
  du -b "$CARRY_DIR"/greencode.xz "$CARRY_DIR"/lib/* >&2
  du -sh "$CARRY_DIR" >&2
}

main() {
  case ${1:-} in
    --print-env)
      print_env
      return
      ;;
    "") ;;
    -h | --help)
      sed -n '2,27p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
      return
      ;;
    *)
      echo "unknown argument: $1 (usage: deploy/build-cuda.sh [--print-env | --help])" >&2
      exit 2
      ;;
  esac
  command -v cc >/dev/null || { echo "a C compiler (cc) is needed for the libcuda stub" >&2; exit 1; }
  command -v xz >/dev/null || { echo "xz is needed to compress the carried binary" >&2; exit 1; }
  install_wheels
  local cu
  cu=$(wheel_root)
  make_cuda_home "$cu"
  make_libcuda_stub
  eval "$(print_env)"
  nvcc --version | tail -2 >&2
  [[ ${SKIP_BUILD:-0} == 1 ]] && return
  build
  stage "$cu"
}

main "$@"
