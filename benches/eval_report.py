#!/usr/bin/env python3
"""One command for EVALUATION.md: runs greencode's evaluations on each model
(HumanEval pass@1 with canonical-solution NLL, single-line infilling, held-out
perplexity, KL against the first model, batch-1 speed and energy) and prints
the markdown table. Results are kept as JSON in --out; with --reuse, runs
whose JSON is already there are skipped (to re-print the table).

usage: eval_report.py MODEL_DIR [MODEL_DIR ...] [--out target/eval] [--reuse]
       (the first model is the reference for KL; GREENCODE overrides the binary)
"""
import argparse
import json
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(args, path, reuse):
    if reuse and path.exists() and path.stat().st_size > 0:
        return json.loads(path.read_text())
    exe = os.environ.get("GREENCODE", str(ROOT / "target/release/greencode"))
    out = subprocess.run([exe, *args, "--format", "json"], check=True, capture_output=True, text=True).stdout
    path.write_text(out)
    return json.loads(out)


def parameters(model):
    """Elements of every tensor in the folder's safetensors files (headers only)."""
    total = 0
    for f in Path(model).glob("*.safetensors"):
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        for key, t in header.items():
            if key != "__metadata__":
                count = 1
                for d in t["shape"]:
                    count *= d
                total += count
    return total


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="+")
    ap.add_argument("--out", default=str(ROOT / "target/eval"))
    ap.add_argument("--reuse", action="store_true")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    reference = a.models[0]
    rows = []
    model_of = {Path(m).name: m for m in a.models}
    for model in a.models:
        name = Path(model).name
        o = lambda kind: out / f"{name}-{kind}.json"
        he = run(["eval", "humaneval", "--model", model, "--canonical-nll",
                  "--out", str(out / f"{name}-humaneval.jsonl")], o("he"), a.reuse)
        infill = run(["eval", "infill", "--model", model, "--out", str(out / f"{name}-infill.jsonl")],
                     o("infill"), a.reuse)
        ppl = run(["eval", "ppl", "--model", model], o("ppl"), a.reuse)
        kl = run(["eval", "kl", "--model", model, "--reference", reference], o("kl"), a.reuse)
        bench = run(["bench", "generate", "--model", model, "--passes", "5"], o("bench"), a.reuse)
        rows.append((name, he, infill, ppl, kl, bench))
    print("| model | parameters | HumanEval pass@1 | canonical NLL (nats/token) | infill exact match | infill edit sim. "
          "| perplexity | bits/byte | KL vs first (nats/token) | top-1 agreement | decode tok/s (median) | mJ/token (median) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, he, infill, ppl, kl, bench in rows:
        joules = bench.get("joules_per_token") or {}
        print(f"| {name} | {parameters(model_of[name]) / 1e6:.2f} M | {he['passed']}/{he['problems']} ({100 * he['pass@1']:.1f}%) | {he['canonical_nll']:.4f} "
              f"| {100 * infill['exact_match']:.1f}% | {infill['edit_similarity']:.4f} | {ppl['ppl']:.3f} "
              f"| {ppl['bits_per_byte']:.4f} | {kl['kl']:.4f} | {100 * kl['top1_agreement']:.1f}% "
              f"| {bench['decode_tokens_per_second']['median']:.0f} "
              f"| {1e3 * joules.get('median', float('nan')):.0f} ({bench.get('energy_source', '?')}) |")
    print(f"\ninfill set {rows[0][2]['set_hash']} ({rows[0][2]['items']} items); HumanEval {rows[0][1]['problems']} problems")


if __name__ == "__main__":
    main()
