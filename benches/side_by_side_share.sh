#!/bin/bash
# Two models on one server (turns) vs alone vs two server processes (oversubscribed).
G=${G:-target/release/greencode}
M=${M:-models/tiny-coder}
B="bench serve --clients 4 --prompt-tokens 256 --new-tokens 128 --requests-per-client 4 --format json"
tps() { python3 -c "import json,sys; d=json.load(open('$1')); r=d[0]; print(r.get('tokens_per_second', r))"; }
for round in 1 2; do
  $G serve --model a=$M --model b=$M --port 8501 --energy estimated > /tmp/s27a.log 2>&1 &
  P=$!; sleep 6
  $G $B --url http://127.0.0.1:8501 --model-name a > /tmp/alone.json
  $G $B --url http://127.0.0.1:8501 --model-name a > /tmp/both_a.json & X=$!
  $G $B --url http://127.0.0.1:8501 --model-name b > /tmp/both_b.json
  wait $X
  kill $P; wait $P 2>/dev/null
  $G serve --model $M --port 8502 --energy estimated > /tmp/s27b.log 2>&1 & P1=$!
  $G serve --model $M --port 8503 --energy estimated > /tmp/s27c.log 2>&1 & P2=$!
  sleep 6
  $G $B --url http://127.0.0.1:8502 > /tmp/two_a.json & X=$!
  $G $B --url http://127.0.0.1:8503 > /tmp/two_b.json
  wait $X
  kill $P1 $P2; wait $P1 $P2 2>/dev/null
  echo "round $round alone: $(tps /tmp/alone.json)  one-server a: $(tps /tmp/both_a.json) b: $(tps /tmp/both_b.json)  two-processes a: $(tps /tmp/two_a.json) b: $(tps /tmp/two_b.json)"
done
