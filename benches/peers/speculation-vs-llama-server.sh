#!/bin/bash
# #26: single-stream greedy decode with and without speculation, greencode
# against llama-server's own speculation, on the same GGUF file, alternated
# ROUNDS times: benches/speculate_single_stream.py's FIM, left-to-right and
# edit sets (50 held-out stdlib files, 64 tokens each, one at a time).
#   greencode: --speculate off | lookup (no prefix cache: every prompt computed)
#   llama-server: none | --spec-type ngram-simple | ngram-mod | --model-draft DRAFT (draft-simple)
# LLAMA_BIN=… MODEL_GGUF=tiny-coder.bf16.gguf DRAFT_GGUF=pruned-full-vocab.gguf benches/peers/speculation-vs-llama-server.sh
cd "$(dirname "$0")/../.."
G=${GREENCODE:-target/release/greencode}
L=${LLAMA_BIN:?set LLAMA_BIN to the folder with llama-server (benches/peers/README.md)}
M=${MODEL_GGUF:?set MODEL_GGUF to tiny-coder as a bf16 GGUF (greencode quantize --type bf16)}
D=${DRAFT_GGUF:-}
ROUNDS=${ROUNDS:-2}
P=8471
wait_up() { for i in $(seq 300); do curl -sf localhost:$P/health >/dev/null && return; sleep 0.2; done; echo "server never came up"; }
llama() { LD_LIBRARY_PATH=$L $L/llama-server -m $M -t 2 -np 1 -c 4096 --port $P "$@" 2>/dev/null & SP=$!; }
for round in $(seq $ROUNDS); do
  for who in greencode-off greencode-lookup llama-none llama-ngram-simple llama-ngram-mod ${D:+llama-draft}; do
    case $who in
      greencode-off) $G --threads 2 serve --model $M --port $P --no-prefix-cache --speculate off 2>/dev/null & SP=$!;;
      greencode-lookup) $G --threads 2 serve --model $M --port $P --no-prefix-cache --speculate lookup 2>/dev/null & SP=$!;;
      llama-none) llama;;
      llama-ngram-simple) llama --spec-type ngram-simple;;
      llama-ngram-mod) llama --spec-type ngram-mod;;
      llama-draft) llama --model-draft $D --spec-draft-n-max 8;;
    esac
    wait_up
    flag=""; case $who in llama-*) flag=--llama;; esac
    python3 benches/speculate_single_stream.py http://127.0.0.1:$P $flag | sed "s/^{/{\"round\": $round, \"server\": \"$who\", /"
    kill $SP; wait $SP 2>/dev/null
  done
done
