#!/usr/bin/env bash
# Runs the pruning comparisons of PRUNING.md on tiny-coder and prints the table rows.
# Usage: benches/prune_table.sh [OUT_DIR]   (needs a release build: cargo build --release)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-target/prune-table}
mkdir -p "$out"
bin=${GREENCODE_BIN:-target/release/greencode}
row() { # name, folder
  python3 - "$1" "$2/prune_report.json" <<'PY'
import json, sys
name, path = sys.argv[1], sys.argv[2]
r = json.load(open(path))
a, kl = r["held_out_after"], r["held_out_kl"]
b = r["held_out_before"]
secs = dict(r["seconds"])["total"]
print(f"| {name} | {r['kept_layers'] and 12 - len(r['kept_layers'])} | {r['ffn_widths'][0]} | {r['removed_fraction']*100:.1f}% | {kl['kl']:.4f} | {kl['top1_agreement']*100:.1f}% | {b['bits_per_byte']:.4f} → {a['bits_per_byte']:.4f} | {a['ppl']:.2f} | {secs:.0f} s |")
PY
}
echo "| run | layers removed | FFN width | params removed | held-out KL | top-1 agree | bits/byte | ppl | time |"
echo "|---|---|---|---|---|---|---|---|---|"
for metric in kl bi angular; do
  for n in 1 2 3; do
    d="$out/layers-$metric-$n"
    $bin prune --out "$d" --force --vocab-min-count 0 --drop-layers "$n" --layer-metric "$metric" >/dev/null 2>"$d.log"
    row "layers $metric" "$d"
  done
done
for w in 768 512; do
  for score in top act random; do
    d="$out/ffn-$score-$w"
    $bin prune --out "$d" --force --vocab-min-count 0 --ffn-keep "$w" --ffn-score "$score" >/dev/null 2>"$d.log"
    row "ffn $score" "$d"
  done
done
d="$out/vocab"
$bin prune --out "$d" --force >/dev/null 2>"$d.log"
row "vocab only (min count 1)" "$d"
d="$out/target-0.22"
$bin prune --out "$d" --force --target 0.22 >/dev/null 2>"$d.log"
row "--target 0.22" "$d"
