#!/usr/bin/env python3
"""One command for the batch-1 table of BENCHMARKS.md: greencode, llama.cpp and
HF transformers on the same model, prompt 256 + 128 new tokens, N passes each,
run one after the other in one session. Prints a markdown table of
min / median / max prompt and decode tokens/s, and each engine's ratio to
llama.cpp's median. Engines that are not available are skipped with a note.

llama-bench's `tg128` decodes from an empty context, while greencode and
transformers decode after the 256-token prompt; llama-bench also runs at
`-d 256` (decode after 256 tokens of context, the same work), shown as its
own row, and the last column gives each engine's decode against it.

usage: compare_generate.py [--threads 2] [--passes 5] [--gguf F32.gguf]
env:   LLAMA_CPP_DIR (llama.cpp build dir), GREENCODE (binary, default target/release/greencode)
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def spread(values):
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def greencode(threads, passes):
    exe = os.environ.get("GREENCODE", str(ROOT / "target/release/greencode"))
    out = subprocess.run(
        [exe, "--threads", str(threads), "bench", "generate", "--prompt-tokens", "256",
         "--new-tokens", "128", "--passes", str(passes), "--format", "json"],
        check=True, capture_output=True, text=True).stdout
    r = json.loads(out)
    return {"prompt": r["prompt_tokens_per_second"], "decode": r["decode_tokens_per_second"]}


def llama_cpp(threads, passes, gguf):
    if not os.environ.get("LLAMA_CPP_DIR") or not gguf:
        return None
    env = dict(os.environ, THREADS=str(threads), REPS=str(passes))
    out = subprocess.run([str(HERE / "llama_cpp.sh"), gguf, "-d", "0,256"], check=True,
                         capture_output=True, text=True, env=env).stdout
    rows = json.loads(out)
    pick = lambda key, depth: spread(next(r["samples_ts"] for r in rows
                                          if r[key] > 0 and r.get("n_depth", 0) == depth))
    return ({"prompt": pick("n_prompt", 0), "decode": pick("n_gen", 0)},
            {"prompt": pick("n_prompt", 256), "decode": pick("n_gen", 256)})


def transformers(threads, passes):
    try:
        out = subprocess.run([sys.executable, str(HERE / "transformers_bench.py"), "--threads",
                              str(threads), "--passes", str(passes)],
                             check=True, capture_output=True, text=True).stdout
    except (subprocess.CalledProcessError, FileNotFoundError) as e:
        print(f"note: transformers skipped ({e})", file=sys.stderr)
        return None
    r = json.loads(out)
    return {"prompt": r["prompt_tps"], "decode": r["decode_tps"]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--passes", type=int, default=5)
    ap.add_argument("--gguf", default=os.environ.get("GGUF"))
    a = ap.parse_args()
    ours = greencode(a.threads, a.passes)
    llama = llama_cpp(a.threads, a.passes, a.gguf)
    results = {
        "greencode": ours,
        "llama.cpp": llama[0] if llama else None,
        "llama.cpp -d 256": llama[1] if llama else None,
        "transformers": transformers(a.threads, a.passes),
    }
    print(json.dumps(results), file=sys.stderr)
    ref, deep = results["llama.cpp"], results["llama.cpp -d 256"]
    fmt = lambda s: f"{s['min']:.0f} / {s['median']:.0f} / {s['max']:.0f}"
    print(f"| engine ({a.threads} threads) | prompt tok/s min / median / max | decode tok/s min / median / max"
          " | prompt × llama.cpp | decode × llama.cpp | decode × llama.cpp -d 256 |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, r in results.items():
        if r is None:
            print(f"| {name} | not available | | | | |")
            continue
        ratio = lambda k, base: f"{r[k]['median'] / base[k]['median']:.2f}" if base else "–"
        print(f"| {name} | {fmt(r['prompt'])} | {fmt(r['decode'])} | {ratio('prompt', ref)}"
              f" | {ratio('decode', ref)} | {ratio('decode', deep)} |")


if __name__ == "__main__":
    main()
