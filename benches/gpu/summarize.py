#!/usr/bin/env python3
"""A short table of a benches/gpu/run.sh output folder (argument: the folder)."""

import json
import pathlib
import sys

# Hugging Face transformers generate() on the same H200, random weights, bf16,
# prompt 512, 256 new tokens (REFERENCE.md, "Measured here"): tok/s ranges.
TRANSFORMERS = {
    ("codeqwen1.5-7b", 1): (12.4, 12.5),
    ("codeqwen1.5-7b", 16): (196, 248),
    ("flab-cq-5.7b", 1): (42.9, 44.8),
    ("flab-cq-5.7b", 16): (671, 679),
}


def lines(path):
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


def main():
    out = pathlib.Path(sys.argv[1])
    print("== kernels")
    kernels = lines(out / "kernels.jsonl")
    if not kernels:
        print("  (no results)")
    for k in kernels:
        if k.get("kernel") == "model_path":
            print(f"  model path vs cpu: max rel err {k['max_rel_err']:.2e}, tokens equal {k['same_tokens']}, pass {k['pass']}")
            continue
        c = k["case"]
        sp = f"{k['speedup']:.2f}x ({k['fused_us']:.1f} vs {k['candle_us']:.1f} us)" if k.get("speedup") else ""
        print(f"  {k['dtype']:4} h{c['heads']}/{c['kv_heads']} d{c['head_dim']} len {c['len']:5}: "
              f"rel err {k['rel_err']:.1e} {'ok' if k['pass'] else 'FAIL'} {sp}")
    bench = lines(out / "bench.jsonl")
    if bench:
        r = bench[0]
        print(f"== generation (prompt {r['prompt_tokens']}, {r['new_tokens']} new tokens, {r['dtype']}, {r['device']})")
    else:
        print("== generation\n  (no results)")
    if bench:
        print(f"  {'shape':16} {'bs':>3} {'decode tok/s':>12} {'x HF':>6} {'floor %':>7} {'TTFT ms':>8} {'J/tok':>7} {'peak GiB':>8}")
    for r in bench:
        tps = r["decode_tokens_per_second"]["median"]
        hf = TRANSFORMERS.get((r["model"], r["batch"]))
        x = f"{tps / max(hf):.1f}" if hf else "-"
        j = r.get("joules_per_token", {}) or {}
        mem = r.get("peak_gpu_memory_bytes") or r.get("peak_device_memory_used_bytes")
        print(f"  {r['model']:16} {r['batch']:>3} {tps:>12.1f} {x:>6} "
              f"{100 * (r.get('share_of_floor') or 0):>6.0f}% {r['ttft_ms']['median']:>8.1f} "
              f"{j.get('median', float('nan')):>7.3f} {(mem or 0) / 2**30:>8.2f}")
    candle = lines(out / "bench_candle.jsonl")
    if candle:
        print("== the candle path alone (GREENCODE_NO_CUDA_KERNELS=1, one pass)")
        fused = {(r["model"], r["batch"]): r for r in bench}
        for r in candle:
            tps = r["decode_tokens_per_second"]["median"]
            f = fused.get((r["model"], r["batch"]))
            gain = f"{f['decode_tokens_per_second']['median'] / tps:.2f}x with kernels" if f else ""
            print(f"  {r['model']:16} {r['batch']:>3} {tps:>12.1f} tok/s, TTFT {r['ttft_ms']['median']:.1f} ms  {gain}")
    print("== serve energy")
    for s in lines(out / "serve.jsonl"):
        if "error" in s:
            print(f"  {s['error']}")
            continue
        print(f"  {s['requests']} requests ({s['errors']} errors), {s['tokens_per_second']:.0f} tok/s, "
              f"requests {s['sum_request_joules']:.1f} J vs {s.get('reference', 'nvml')} {s['nvml_delta_joules']:.1f} J: "
              f"{100 * s['rel_diff']:+.2f}% ({'within' if s['within_2pct'] else 'OUTSIDE'} 2%)")


if __name__ == "__main__":
    main()
