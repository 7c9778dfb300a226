#!/usr/bin/env bash
# Start llama.cpp's llama-server on a GGUF (loopback), wait for /health, print the base URL,
# then keep running until SIGTERM/SIGINT, which stops the server.
# usage: LLAMA_CPP_DIR=/path/to/llama.cpp/build llama_server.sh MODEL.gguf [PORT] [extra args...]
# env: LLAMA_CPP_DIR (required), THREADS (default 2), PARALLEL (default 8), CTX (default 8192),
#      HOST (default 127.0.0.1), WAIT_S (default 120), SERVER_LOG (default /dev/null)
set -euo pipefail

: "${LLAMA_CPP_DIR:?set LLAMA_CPP_DIR to a llama.cpp build dir (with bin/llama-server)}"
server="$LLAMA_CPP_DIR/bin/llama-server"
[ -x "$server" ] || { echo "error: $server not found or not executable; build it (see README.md)" >&2; exit 1; }
[ $# -ge 1 ] || { echo "usage: $0 MODEL.gguf [PORT] [llama-server args...]" >&2; exit 2; }
model="$1"; shift
[ -f "$model" ] || { echo "error: GGUF not found: $model" >&2; exit 1; }
port="${1:-8080}"; [ $# -gt 0 ] && shift
host="${HOST:-127.0.0.1}"
url="http://$host:$port"

"$server" -m "$model" -np "${PARALLEL:-8}" -c "${CTX:-8192}" -t "${THREADS:-2}" \
  --host "$host" --port "$port" --no-webui "$@" >"${SERVER_LOG:-/dev/null}" 2>&1 &
pid=$!
stop() { kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; }
trap 'stop; exit 0' TERM INT
trap stop EXIT

deadline=$(( $(date +%s) + ${WAIT_S:-120} ))
until curl -sf "$url/health" >/dev/null 2>&1; do
  kill -0 "$pid" 2>/dev/null || { echo "error: llama-server exited early (see SERVER_LOG)" >&2; exit 1; }
  [ "$(date +%s)" -lt "$deadline" ] || { echo "error: llama-server not healthy after ${WAIT_S:-120}s" >&2; exit 1; }
  sleep 0.5
done
echo "$url"
wait "$pid"
