#!/bin/bash
# Draft recipe: prune settings → bench generate speed-up with --speculate draft.
cd "$(dirname "$0")/.."
G=target/release/greencode
S=${S:-/tmp/greencode-drafts}; mkdir -p $S
for cfg in "2 1024" "4 768" "6 512" "8 512" "6 1024" "10 256"; do
  set -- $cfg
  d=$S/draft-d$1-f$2
  [ -d $d ] || $G prune --out $d --drop-layers $1 --ffn-keep $2 --calib-samples 8 --calib-len 256 --eval-files 0 > /dev/null 2>&1
done
B="bench generate --prompt-tokens 256 --new-tokens 128 --passes 5 --format json"
row() { python3 -c "
import json,sys; d=json.load(open('$1'))
print('%-16s decode %7.1f tok/s  mJ/tok %6.2f  drafted/pass %6s  acceptance %s' % ('$2', d['decode_tokens_per_second']['median'], d['joules_per_token']['median']*1e3, d.get('drafted_per_pass'), d.get('draft_acceptance')))"; }
for round in 1 2; do
  $G $B > /tmp/off.json; row /tmp/off.json off
  $G $B --speculate lookup > /tmp/lk.json; row /tmp/lk.json lookup
  for cfg in "2 1024" "4 768" "6 512" "8 512" "6 1024" "10 256"; do
    set -- $cfg
    $G $B --speculate draft --draft $S/draft-d$1-f$2 > /tmp/dr.json; row /tmp/dr.json "d$1-f$2"
  done
done
