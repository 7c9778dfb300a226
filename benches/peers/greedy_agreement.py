#!/usr/bin/env python3
"""Greedy agreement of greencode and llama.cpp on the same GGUF file (#23):
golden.json's prompts and cuts of held-out stdlib files, N tokens each,
`greencode generate --format json` against llama-server's `/completion`
(`temperature 0`, `top_k 1`, prompt as the same token ids). Prints one
JSON line per prompt and a summary: continuations identical token for
token, where the others part, and the share of tokens before each parting.

usage: LLAMA_CPP_DIR=… greedy_agreement.py FILE.gguf [--tokens 32] [--cuts 16]
env:   GREENCODE (binary, default target/release/greencode), THREADS (2)
"""
import argparse
import json
import os
import subprocess
import sys
import sysconfig
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def post(url, body):
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.loads(r.read())


def prompts(cuts):
    golden = json.loads((ROOT / "models/tiny-coder/golden.json").read_text())
    out = [c["prompt"] for c in golden["cases"]]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.glob("*.py") if p.stat().st_size > 4000)
    step = max(1, len(files) // cuts)
    for p in files[::step][:cuts]:
        text = p.read_text(errors="replace")
        out.append(text[:1200])
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("gguf")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--cuts", type=int, default=16)
    ap.add_argument("--port", type=int, default=18111)
    args = ap.parse_args()
    exe = os.environ.get("GREENCODE", str(ROOT / "target/release/greencode"))
    threads = os.environ.get("THREADS", "2")
    bindir = Path(os.environ["LLAMA_CPP_DIR"]) / "bin"
    env = dict(os.environ, LD_LIBRARY_PATH=str(bindir))
    server = subprocess.Popen(
        [str(bindir / "llama-server"), "-m", args.gguf, "-t", threads, "-np", "1", "-c", "4096",
         "--host", "127.0.0.1", "--port", str(args.port), "--no-webui"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{args.port}"
    try:
        for _ in range(240):
            try:
                urllib.request.urlopen(url + "/health", timeout=2)
                break
            except Exception:
                time.sleep(0.5)
        same, partings, before = 0, [], []
        for i, prompt in enumerate(prompts(args.cuts)):
            ids = post(url + "/tokenize", {"content": prompt})["tokens"]
            theirs = post(url + "/completion", {
                "prompt": ids, "n_predict": args.tokens, "temperature": 0, "top_k": 1,
                "cache_prompt": False, "return_tokens": True})["tokens"]
            mine = json.loads(subprocess.run(
                [exe, "--threads", threads, "generate", "--model", args.gguf, "--prompt", prompt,
                 "--max-tokens", str(args.tokens), "--format", "json"],
                check=True, capture_output=True, text=True).stdout)
            ours = mine["token_ids"]
            n = min(len(ours), len(theirs))
            part = next((k for k in range(n) if ours[k] != theirs[k]), None)
            if part is None and len(ours) != len(theirs):
                part = n
            if part is None:
                same += 1
            else:
                partings.append(part)
                before.append(part / max(len(ours), len(theirs)))
            print(json.dumps({"prompt": i, "prompt_tokens": len(ids), "our_prompt_tokens": mine["prompt_tokens"], "ours": len(ours), "theirs": len(theirs),
                              "parts_at": part}), flush=True)
        total = same + len(partings)
        print(json.dumps({"identical": same, "of": total, "parting_tokens": partings,
                          "mean_share_before_parting": sum(before) / len(before) if before else None}))
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    sys.exit(main())
