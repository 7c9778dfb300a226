"""Single-stream greedy completions against a running server, for
speculative decoding's before/after (#26): 50 held-out files of the
standard library (python3's, the eval corpus), each as a FIM request (30
lines before the middle line, 10 after) and as a left-to-right completion
of its first 40 lines; 64 tokens each, one request at a time. Prints
completion tokens per second of wall time (prompt included), joules per
token from `usage.energy_joules`, and accepted/rejected draft tokens.

usage: python3 benches/speculate_single_stream.py http://127.0.0.1:8080
"""
import json, sys, time, urllib.request, glob, os, sysconfig
base = sys.argv[1]
files = sorted(glob.glob(os.path.join(sysconfig.get_paths()['stdlib'], '*.py')))
texts = [open(f, encoding='utf-8', errors='replace').read() for f in files]
texts = [t for t in texts if len(t.split('\n')) >= 120][:50]
def post(body):
    r = urllib.request.urlopen(urllib.request.Request(base + "/v1/completions", data=json.dumps(body).encode(), headers={"content-type": "application/json"}))
    return json.loads(r.read())
for kind in ["fim", "ltr"]:
    secs = toks = 0; joules = 0.0; acc = rej = 0
    for t in texts:
        lines = t.split('\n'); at = len(lines) // 2
        if kind == "fim":
            body = {"prompt": "\n".join(lines[at-30:at]) + "\n", "suffix": "\n".join(lines[at:at+10]) + "\n", "max_tokens": 64, "temperature": 0}
        else:
            body = {"prompt": "\n".join(lines[:40]) + "\n", "max_tokens": 64, "temperature": 0, "logit_bias": {}}
        t0 = time.time(); v = post(body); secs += time.time() - t0
        u = v["usage"]; toks += u["completion_tokens"]; joules += u["energy_joules"]
        d = u.get("completion_tokens_details") or {}
        acc += d.get("accepted_prediction_tokens", 0); rej += d.get("rejected_prediction_tokens", 0)
    print(json.dumps({"set": kind, "requests": len(texts), "tokens": toks, "seconds": round(secs, 3), "tokens_per_second": round(toks / secs, 1), "joules_per_token": round(joules / max(toks, 1), 4), "accepted": acc, "rejected": rej}))
