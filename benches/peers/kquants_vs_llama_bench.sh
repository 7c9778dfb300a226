#!/usr/bin/env bash
# greencode against llama-bench on the same GGUF files, alternated (#23):
# a 512-token prompt and decode at depth 256, each file greencode then
# llama.cpp, ROUNDS rounds. One JSON object per run on stdout:
#   {"engine", "file", "bench": "prompt"|"decode", "tok_s", "peak_rss_kib", ...}
#
#   GREENCODE=target/release/greencode LLAMA_CPP_DIR=/work/scratch/.../build-noamx \
#     benches/peers/kquants_vs_llama_bench.sh q15-q4_k_m.gguf q15-q8_0.gguf q15-f16.gguf
#
# Env: THREADS (2), ROUNDS (2), PROMPT (512), DEPTH (256), GEN (64).
set -euo pipefail
GREENCODE=${GREENCODE:-target/release/greencode}
BIN=${LLAMA_CPP_DIR:?set LLAMA_CPP_DIR to a llama.cpp build dir}/bin
THREADS=${THREADS:-2} ROUNDS=${ROUNDS:-2} PROMPT=${PROMPT:-512} DEPTH=${DEPTH:-256} GEN=${GEN:-64}
export LD_LIBRARY_PATH="$BIN${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
[ $# -gt 0 ] || { echo "usage: $0 FILE.gguf..." >&2; exit 2; }

# Runs "$@" under /usr/bin/time -v; prints its stdout, and the peak RSS
# (KiB) into $rss_file.
rss_file=$(mktemp)
timed() {
  /usr/bin/time -v -o "$rss_file.t" "$@" 2>/dev/null
  awk -F': ' '/Maximum resident set size/ {print $2}' "$rss_file.t" > "$rss_file"
}

emit() { # engine file bench tok_s extra-json
  printf '{"engine":"%s","file":"%s","bench":"%s","tok_s":%s,"peak_rss_kib":%s%s}\n' \
    "$1" "$(basename "$2")" "$3" "$4" "$(cat "$rss_file")" "${5:-}"
}

for round in $(seq "$ROUNDS"); do
  for f in "$@"; do
    out=$(timed "$GREENCODE" --threads "$THREADS" bench generate --model "$f" \
      --prompt-tokens "$PROMPT" --new-tokens 1 --passes 2 --format json)
    tok=$(jq '.prompt_tokens_per_second.median' <<<"$out")
    emit greencode "$f" prompt "$tok" ",\"round\":$round,\"kernels\":$(jq '.kernels' <<<"$out")"
    out=$(timed "$BIN/llama-bench" -m "$f" -t "$THREADS" -p "$PROMPT" -n 0 -r 2 -o json)
    emit llama.cpp "$f" prompt "$(jq '.[0].avg_ts' <<<"$out")" ",\"round\":$round"
    out=$(timed "$GREENCODE" --threads "$THREADS" bench generate --model "$f" \
      --prompt-tokens "$DEPTH" --new-tokens "$GEN" --passes 2 --measure-bandwidth --format json)
    emit greencode "$f" decode "$(jq '.decode_tokens_per_second.median' <<<"$out")" \
      ",\"round\":$round,\"bandwidth_gbs\":$(jq '.bandwidth_gbs' <<<"$out"),\"weight_bytes_per_token\":$(jq '.weight_bytes_per_token' <<<"$out"),\"share_of_floor\":$(jq '.share_of_floor' <<<"$out")"
    out=$(timed "$BIN/llama-bench" -m "$f" -t "$THREADS" -p 0 -n "$GEN" -d "$DEPTH" -r 2 -o json)
    emit llama.cpp "$f" decode "$(jq '.[0].avg_ts' <<<"$out")" ",\"round\":$round"
  done
done
rm -f "$rss_file" "$rss_file.t"
