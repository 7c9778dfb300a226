#!/usr/bin/env python3
"""Peer baseline: HF transformers on CPU (float32), prompt + greedy decode throughput.

Each pass times (a) one prefill forward over the prompt (prompt tok/s) and (b) a
model.generate() call with KV cache producing exactly --gen greedy tokens; decode tok/s is
(gen - 1) / (time from the first new token to the last). Prompt ids are drawn from a seeded
RNG over the non-special vocab, like llama-bench's random prompts. Prints one JSON object.
"""
import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM

ROOT = Path(__file__).resolve().parents[2]


class FirstTokenClock:
    """generate() streamer: records when each new token is produced (first put() is the prompt)."""

    def __init__(self):
        self.stamps = []
        self.seen_prompt = False

    def put(self, _ids):
        if self.seen_prompt:
            self.stamps.append(time.perf_counter())
        self.seen_prompt = True

    def end(self):
        pass


def summary(xs):
    return {"min": min(xs), "median": statistics.median(xs), "max": max(xs)}


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default=str(ROOT / "models" / "tiny-coder"), help="HF model folder")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--passes", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1, help="untimed passes first")
    ap.add_argument("--prompt", type=int, default=256, help="prompt tokens")
    ap.add_argument("--gen", type=int, default=128, help="new tokens per pass")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    transformers.utils.logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    cfg = model.config
    # skip ids 0..5 (special tokens of tiny-coder) and any configured special ids
    specials = [getattr(cfg, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id")]
    first = 1 + max([5] + [t for t in specials if t is not None])
    g = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(first, cfg.vocab_size, (1, args.prompt), generator=g)
    mask = torch.ones_like(ids)
    gen_kw = dict(attention_mask=mask, max_new_tokens=args.gen, min_new_tokens=args.gen,
                  do_sample=False, use_cache=True, pad_token_id=cfg.eos_token_id)

    prompt_tps, decode_tps = [], []
    with torch.inference_mode():
        for i in range(args.warmup + args.passes):
            t0 = time.perf_counter()
            model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1)
            t_prefill = time.perf_counter() - t0

            clock = FirstTokenClock()
            out = model.generate(ids, streamer=clock, **gen_kw)
            n_new = out.shape[1] - ids.shape[1]
            assert n_new == args.gen == len(clock.stamps), (n_new, len(clock.stamps))
            if i >= args.warmup:
                prompt_tps.append(args.prompt / t_prefill)
                decode_tps.append((n_new - 1) / (clock.stamps[-1] - clock.stamps[0]))

    print(json.dumps({
        "engine": "transformers",
        "threads": args.threads,
        "passes": args.passes,
        "n_prompt": args.prompt,
        "n_gen": args.gen,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "prompt_tps": summary(prompt_tps),
        "decode_tps": summary(decode_tps),
    }))


if __name__ == "__main__":
    main()
