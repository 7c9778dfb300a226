#!/bin/bash
# #25: bench editor, both client shapes, greencode vs llama-server --cache-reuse 256, same GGUF, alternated twice, 100 keystrokes.
cd "$(dirname "$0")/../.."
G=${GREENCODE:-target/release/greencode}
L=${LLAMA_BIN:?set LLAMA_BIN to the folder with llama-server (benches/peers/README.md)}
M=${MODEL_GGUF:?set MODEL_GGUF to tiny-coder as a bf16 GGUF (greencode quantize --type bf16)}
wait_up() { for i in $(seq 200); do curl -sf localhost:$1/health >/dev/null && return; sleep 0.2; done; echo "server on $1 never came up"; }
for round in 1 2; do
  for who in greencode llama-server-b256 llama-server-b512; do
    case $who in
      greencode) $G --threads 2 serve --model $M --port 8470 --cache-reuse 256 2>/tmp/e25_$who.log & SP=$!;;
      llama-server-b256) LD_LIBRARY_PATH=$L $L/llama-server -m $M -t 2 -c 4096 -b 256 -ub 256 --cache-reuse 256 --port 8470 2>/tmp/e25_$who.log & SP=$!;;
      llama-server-b512) LD_LIBRARY_PATH=$L $L/llama-server -m $M -t 2 -c 4096 -b 512 -ub 512 --cache-reuse 256 --port 8470 2>/tmp/e25_$who.log & SP=$!;;
    esac
    wait_up 8470
    for client in continue llama-vscode; do
      echo "== round $round $who $client"
      $G bench editor --url http://127.0.0.1:8470 --client $client --keystrokes 100 --files 5 --format json
    done
    kill $SP; wait $SP 2>/dev/null
  done
done
