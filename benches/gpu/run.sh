#!/usr/bin/env bash
# The GPU benchmark of issue #12, prepared to run in one device call on an
# H200 (16 cores, CUDA 13.0 driver) in under 8 minutes, with nothing built
# there: the CUDA binary comes compressed in the carry folder that
# deploy/build-cuda.sh stages (gpu-carry/: greencode.xz, lib/, BUILD_INFO).
#
#   device run: carry ["gpu-carry"], command "bash benches/gpu/run.sh"
#
# Parts, each with its own time limit inside an overall budget; a failing
# part is logged and the next one still runs:
#   1. kernels  `bench kernels --device cuda`: the fused decode-attention
#               kernel against the candle path (relative error, bf16 and f32,
#               several sizes) with its speed-up, and the model's CUDA path
#               against the CPU's.
#   2. bench    `bench generate --synth SHAPE --device cuda --batch 1,16`,
#               prompt 512, 256 new tokens, for codeqwen1.5-7b and
#               flab-cq-5.7b: decode tok/s, time to first token, peak GPU
#               memory, joules per token (NVML), share of the 4.25 TB/s floor.
#   3. serve    `serve --synth flab-cq-5.7b --device cuda` under 16 concurrent
#               clients: the requests' usage.energy_joules summed against
#               the NVML counter delta read independently (must be within 2%).
#   4. ab       if time is left: the 5.7B bench again (one pass) with
#               GREENCODE_NO_CUDA_KERNELS=1, i.e. the candle path alone, to
#               show what the custom kernels buy.
# If part 1 finds the model's CUDA path wrong, parts 2-3 run with
# GREENCODE_NO_CUDA_KERNELS=1 (noted in the log and bench lines' file name).
# Output (JSON lines and logs) goes to $OUT (the device tool brings it back):
#   env.txt kernels.jsonl bench.jsonl serve.jsonl bench_candle.jsonl run.log summary.txt
#
# Dry run of the plumbing on a CPU machine (CPU build, tiny shape, energy
# from greencode's own meter instead of NVML):
#   DEVICE=cpu SHAPES=tiny SERVE_SHAPE=tiny PROMPT_TOKENS=32 NEW_TOKENS=8 \
#   SERVE_ENERGY=auto REFERENCE=metrics KERNEL_ITERS=0 OUT=/tmp/gpu-dry benches/gpu/run.sh
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
CARRY=${CARRY_DIR:-$ROOT/gpu-carry}
OUT=${OUT:-$ROOT/gpu-out}
BUDGET_S=${BUDGET_S:-450}   # whole script; the device call gets a little more
PORT=${PORT:-18080}
DEVICE=${DEVICE:-cuda}
SHAPES=${SHAPES:-codeqwen1.5-7b flab-cq-5.7b}
SERVE_SHAPE=${SERVE_SHAPE:-flab-cq-5.7b}
PROMPT_TOKENS=${PROMPT_TOKENS:-512}
NEW_TOKENS=${NEW_TOKENS:-256}
SERVE_ENERGY=${SERVE_ENERGY:-nvml}
REFERENCE=${REFERENCE:-nvml}
KERNEL_ITERS=${KERNEL_ITERS:-200}
mkdir -p "$OUT"
LOG="$OUT/run.log"
START=$(date +%s)
WORK=$(mktemp -d)
BIN="$WORK/greencode"

# Progress goes to the log and to the caller's stderr (fd 3), whatever a
# part's own stderr is redirected to.
exec 3>&2
log() { printf '[%4ds] %s\n' "$(($(date +%s) - START))" "$*" | tee -a "$LOG" >&3; }
left() { echo $((BUDGET_S - ($(date +%s) - START))); }

# Runs a part with at most LIMIT seconds (less if the budget is nearly spent).
part() {
  local name=$1 limit=$2
  shift 2
  local t
  t=$(left)
  ((t < limit)) && limit=$t
  if ((limit < 10)); then
    log "$name: skipped, budget spent"
    return 1
  fi
  log "$name: start (limit ${limit}s)"
  local t0 rc
  t0=$(date +%s)
  timeout --kill-after=5 "$limit" "$@"
  rc=$?
  log "$name: exit $rc after $(($(date +%s) - t0))s$([[ $rc == 124 || $rc == 137 ]] && echo ' (timed out)')"
  return $rc
}

# --- the binary and its libraries ------------------------------------------
if [[ ! -f $CARRY/greencode.xz ]]; then
  log "no $CARRY/greencode.xz: run deploy/build-cuda.sh on the build machine and carry gpu-carry"
  exit 2
fi
if command -v xz >/dev/null; then
  xz -dc "$CARRY/greencode.xz" >"$BIN"
else
  python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' \
    "$CARRY/greencode.xz" "$BIN"
fi
chmod +x "$BIN"

# Folder holding library $1: the carried ones, the driver's, then CUDA
# wheels of any Python (PyTorch's venv ships cuBLAS 13), then anywhere.
lib_dir() {
  local d
  for d in "$CARRY/lib" /usr/local/nvidia/lib64 /usr/local/nvidia/lib \
    /opt/torch/.venv/lib/python3*/site-packages/nvidia/cu13/lib \
    /usr/local/lib/python3*/dist-packages/nvidia/cu13/lib \
    /usr/lib/python3/dist-packages/nvidia/cu13/lib \
    /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib /usr/lib/x86_64-linux-gnu; do
    [[ -e $d/$1 ]] && { echo "$d"; return 0; }
  done
  d=$(timeout 20 find / -xdev \( -path /proc -o -path /sys \) -prune -o -name "$1" -print 2>/dev/null | head -1)
  [[ -n $d ]] && dirname "$d"
}
LIBPATH=""
for so in libcuda.so.1 libnvidia-ml.so.1 libcudart.so.13 libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libnvrtc.so.13; do
  d=$(lib_dir "$so")
  if [[ -z $d ]]; then
    log "library $so not found"
    continue
  fi
  case ":$LIBPATH:" in *":$d:"*) ;; *) LIBPATH="${LIBPATH:+$LIBPATH:}$d" ;; esac
done
export LD_LIBRARY_PATH="$LIBPATH${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
log "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"

{
  echo "date: $(date -u +%FT%TZ)"
  cat "$CARRY/BUILD_INFO" 2>/dev/null
  echo "--- ldd"
  ldd "$BIN"
  echo "--- nvidia-smi"
  nvidia-smi --query-gpu=name,driver_version,memory.total,power.limit,clocks.sm,clocks.mem --format=csv 2>&1
  echo "--- cpu"
  nproc
  grep -m1 'model name' /proc/cpuinfo
  echo "--- greencode"
  "$BIN" --version 2>&1
} >"$OUT/env.txt" 2>&1
if ldd "$BIN" | grep -q 'not found'; then
  log "missing libraries: $(ldd "$BIN" | grep 'not found' | tr -s ' \t' ' ')"
fi

# --- 1. kernels --------------------------------------------------------------
part kernels 75 "$BIN" bench kernels --device "$DEVICE" --iters "$KERNEL_ITERS" --format json >"$OUT/kernels.jsonl" 2>>"$LOG"

if ! python3 - "$OUT/kernels.jsonl" <<'PY'
import json, sys
ok = any(json.loads(l).get("kernel") == "model_path" and json.loads(l)["pass"]
         for l in open(sys.argv[1]) if l.strip())
sys.exit(0 if ok else 1)
PY
then
  if [[ $DEVICE != cpu ]]; then
    log "the model's CUDA path failed its check (or did not run): the rest runs on the candle path alone"
    export GREENCODE_NO_CUDA_KERNELS=1
  fi
fi

# --- 2. generation benchmarks ------------------------------------------------
: >"$OUT/bench.jsonl"
for shape in $SHAPES; do
  part "bench $shape" 170 "$BIN" bench generate --synth "$shape" --device "$DEVICE" --batch 1,16 \
    --prompt-tokens "$PROMPT_TOKENS" --new-tokens "$NEW_TOKENS" --passes 2 --bandwidth-gbs 4250 --format json \
    >>"$OUT/bench.jsonl" 2>>"$LOG"
done

# --- 3. serve: per-request energy against the NVML counter -------------------
serve_check() {
  "$BIN" serve --synth "$SERVE_SHAPE" --device "$DEVICE" --port "$PORT" --max-batch 16 \
    --energy "$SERVE_ENERGY" >"$OUT/serve.log" 2>&1 &
  local pid=$!
  python3 "$ROOT/benches/gpu/serve_energy.py" --url "http://127.0.0.1:$PORT" --reference "$REFERENCE" --server-pid "$pid" \
    --clients 16 --requests-per-client 3 --max-tokens 96 --ready-timeout 90 >"$OUT/serve.jsonl"
  local rc=$?
  kill "$pid" 2>/dev/null
  wait "$pid" 2>/dev/null
  return $rc
}
export BIN OUT PORT ROOT DEVICE SERVE_SHAPE SERVE_ENERGY REFERENCE
export -f serve_check
part serve 130 bash -c serve_check
# The server's log without its per-request lines (the client has those).
grep -v '"event":"request"' "$OUT/serve.log" >>"$LOG" 2>/dev/null
rm -f "$OUT/serve.log"

# --- 4. the candle path alone, for comparison ---------------------------------
if [[ -z ${GREENCODE_NO_CUDA_KERNELS:-} ]] && (($(left) > 90)); then
  last=${SHAPES##* }
  GREENCODE_NO_CUDA_KERNELS=1 part "ab $last (no custom kernels)" 90 "$BIN" bench generate --synth "$last" \
    --device "$DEVICE" --batch 1,16 --prompt-tokens "$PROMPT_TOKENS" --new-tokens "$NEW_TOKENS" --passes 1 \
    --bandwidth-gbs 4250 --format json >"$OUT/bench_candle.jsonl" 2>>"$LOG"
fi

# --- summary -----------------------------------------------------------------
python3 "$ROOT/benches/gpu/summarize.py" "$OUT" | tee "$OUT/summary.txt"
log "done in $(($(date +%s) - START))s"
rm -rf "$WORK"
