#!/usr/bin/env bash
# Run llama.cpp's llama-bench on a GGUF and print its JSON report on stdout.
# usage: LLAMA_CPP_DIR=/path/to/llama.cpp/build llama_cpp.sh MODEL.gguf [extra llama-bench args...]
# env: LLAMA_CPP_DIR (build dir holding bin/llama-bench; required), THREADS (default 2),
#      PROMPT (default 256), GEN (default 128), REPS (default 5)
set -euo pipefail

: "${LLAMA_CPP_DIR:?set LLAMA_CPP_DIR to a llama.cpp build dir (with bin/llama-bench)}"
bench="$LLAMA_CPP_DIR/bin/llama-bench"
[ -x "$bench" ] || { echo "error: $bench not found or not executable; build it (see README.md)" >&2; exit 1; }
[ $# -ge 1 ] || { echo "usage: $0 MODEL.gguf [llama-bench args...]" >&2; exit 2; }
model="$1"; shift
[ -f "$model" ] || { echo "error: GGUF not found: $model" >&2; exit 1; }

exec "$bench" -m "$model" -t "${THREADS:-2}" -p "${PROMPT:-256}" -n "${GEN:-128}" \
  -r "${REPS:-5}" -o json "$@"
