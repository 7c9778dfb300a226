"""Single-stream greedy completions against a running server, for
speculative decoding's before/after (#26): 50 held-out files of the
standard library (python3's, the eval corpus), one request at a time, 64
tokens each, in three sets:

- `fim`: a FIM request (30 lines before the middle line, 10 after);
- `ltr`: a left-to-right completion of the file's first 40 lines;
- `edit`: the file re-sent with one line changed: its first 32 lines, then
  the same file again up to its 16th line with that line edited (a
  trailing comment), to be continued (the next lines are in the prompt,
  as when an editor or a chat sends a file again after an edit; sized for
  tiny-coder's 1,024-token context).

Prints, per set, completion tokens per second of wall time (prompt
included), decode tokens per second (from the first token on: greencode
streamed, the time from the first chunk to the last over the tokens after
the first; llama-server its own `timings.predicted_n / predicted_ms`),
joules per token (greencode's `usage.energy_joules`) and the draft tokens
accepted and rejected.

usage: python3 benches/speculate_single_stream.py URL [--llama] [--sets fim,ltr,edit]
  --llama: the server is llama-server (FIM through `/infill`, the rest
  through `/completion`; draft counts from its `timings`).
"""
import argparse, glob, json, os, sysconfig, time, urllib.request

ap = argparse.ArgumentParser()
ap.add_argument("url")
ap.add_argument("--llama", action="store_true")
ap.add_argument("--sets", default="fim,ltr,edit")
args = ap.parse_args()
files = sorted(glob.glob(os.path.join(sysconfig.get_paths()['stdlib'], '*.py')))
texts = [open(f, encoding='utf-8', errors='replace').read() for f in files]
texts = [t for t in texts if len(t.split('\n')) >= 120][:50]


def post(path, body):
    req = urllib.request.Request(args.url + path, data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json"})
    return json.loads(urllib.request.urlopen(req).read())


def request(kind, lines):
    """(prompt, suffix or None) of one request."""
    at = len(lines) // 2
    if kind == "fim":
        return "\n".join(lines[at - 30:at]) + "\n", "\n".join(lines[at:at + 10]) + "\n"
    if kind == "ltr":
        return "\n".join(lines[:40]) + "\n", None
    edited = lines[:16]
    edited[15] = edited[15] + "  # edited"
    return "\n".join(lines[:32]) + "\n\n" + "\n".join(edited) + "\n", None


def stream(body):
    """(usage, seconds from the first content chunk to the last) of a streamed completion."""
    req = urllib.request.Request(args.url + "/v1/completions", data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json"})
    first = last = None; usage = None
    with urllib.request.urlopen(req) as r:
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            if any(c.get("text") for c in chunk.get("choices", [])):
                now = time.time()
                first = first or now
                last = now
    return usage, (last - first) if first else 0.0


def complete(prompt, suffix):
    """(tokens, decode tokens, decode seconds, joules, accepted, rejected) of one greedy completion."""
    if args.llama:
        common = {"n_predict": 64, "temperature": 0, "top_k": 1, "cache_prompt": False}
        if suffix is None:
            v = post("/completion", dict(common, prompt=prompt))
        else:
            v = post("/infill", dict(common, input_prefix=prompt, input_suffix=suffix))
        t = v.get("timings", {})
        drafted, kept = t.get("draft_n", 0), t.get("draft_n_accepted", 0)
        return (v["tokens_predicted"], t.get("predicted_n", 0), t.get("predicted_ms", 0.0) / 1e3,
                0.0, kept, drafted - kept)
    body = {"prompt": prompt, "max_tokens": 64, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    if suffix is not None:
        body["suffix"] = suffix
    u, secs = stream(body)
    d = u.get("completion_tokens_details") or {}
    n = u["completion_tokens"]
    return (n, max(n - 1, 0), secs, u.get("energy_joules", 0.0),
            d.get("accepted_prediction_tokens", 0), d.get("rejected_prediction_tokens", 0))


for kind in args.sets.split(","):
    secs = toks = 0; dtoks = 0; dsecs = 0.0; joules = 0.0; acc = rej = 0
    for t in texts:
        prompt, suffix = request(kind, t.split('\n'))
        t0 = time.time(); n, dn, ds, j, a, r = complete(prompt, suffix); secs += time.time() - t0
        toks += n; dtoks += dn; dsecs += ds; joules += j; acc += a; rej += r
    print(json.dumps({"set": kind, "requests": len(texts), "tokens": toks, "seconds": round(secs, 3),
                      "tokens_per_second": round(toks / secs, 1),
                      "decode_tokens_per_second": round(dtoks / dsecs, 1) if dsecs else None,
                      "joules_per_token": round(joules / max(toks, 1), 4),
                      "accepted": acc, "rejected": rej}), flush=True)
