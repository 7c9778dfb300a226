#!/usr/bin/env python3
"""Per-request energy of a running `greencode serve` against the NVML counter.

Waits for /health, sends one warm-up request, then reads the GPU's NVML
total-energy counter (through libnvidia-ml directly: no Python package
needed) and greencode's /metrics, runs N concurrent clients that each send
requests back to back, and reads both again right after the last response.
While requests are in flight every joule the server meters goes to some
request (idle energy is only booked while nothing runs), so the requests'
usage.energy_joules must add up to the counter's delta: within 2% passes.
Prints one JSON object. `--reference metrics` compares against greencode's
own meter total instead (a plumbing check for machines without NVML).
"""

import argparse
import ctypes
import json
import os
import re
import sys
import threading
import time
import urllib.request

PROMPT = (
    "import os\nimport sys\n\n\ndef read_lines(path):\n"
    "    with open(path) as f:\n        return [line.rstrip() for line in f]\n\n\n"
) * 12


class Nvml:
    """NVML's total-energy counter of GPU 0, in joules."""

    def __init__(self):
        self.lib = ctypes.CDLL("libnvidia-ml.so.1")
        self._check(self.lib.nvmlInit_v2(), "nvmlInit_v2")
        self.handle = ctypes.c_void_p()
        self._check(self.lib.nvmlDeviceGetHandleByIndex_v2(0, ctypes.byref(self.handle)), "handle")

    @staticmethod
    def _check(rc, what):
        if rc != 0:
            raise RuntimeError(f"NVML {what} failed: {rc}")

    def joules(self):
        mj = ctypes.c_ulonglong()
        self._check(self.lib.nvmlDeviceGetTotalEnergyConsumption(self.handle, ctypes.byref(mj)), "energy")
        return mj.value / 1000.0


def http(url, body=None, timeout=120):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.status, r.read().decode()


def metric_sum(text, name):
    total = 0.0
    for line in text.splitlines():
        m = re.match(rf"^{re.escape(name)}(\{{[^}}]*\}})?\s+(\S+)$", line)
        if m:
            total += float(m.group(2))
    return total


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests-per-client", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--ready-timeout", type=float, default=90)
    ap.add_argument("--reference", choices=["nvml", "metrics"], default="nvml")
    ap.add_argument("--server-pid", type=int, help="give up at once if this process exits")
    a = ap.parse_args()

    deadline = time.time() + a.ready_timeout
    while True:
        try:
            if http(a.url + "/health", timeout=5)[0] == 200:
                break
        except Exception:
            pass
        gone = False
        if a.server_pid:
            try:
                os.kill(a.server_pid, 0)
            except OSError:
                gone = True
        if gone or time.time() > deadline:
            why = "server exited before it was ready" if gone else "server not ready"
            print(json.dumps({"check": "serve_energy", "error": why}))
            return 1
        time.sleep(0.5)

    body = {"prompt": PROMPT, "max_tokens": a.max_tokens, "temperature": 0}
    http(a.url + "/v1/completions", body)  # warm-up: kernel loads, allocations
    if a.reference == "nvml":
        read = Nvml().joules
    else:
        read = lambda: metric_sum(http(a.url + "/metrics")[1], "greencode_energy_joules_total")  # noqa: E731

    results, errors = [], []
    lock = threading.Lock()

    def client():
        for _ in range(a.requests_per_client):
            try:
                status, text = http(a.url + "/v1/completions", body)
                usage = json.loads(text)["usage"]
                with lock:
                    results.append(usage)
            except Exception as e:  # noqa: BLE001 - reported, not fatal
                with lock:
                    errors.append(str(e))

    m0 = http(a.url + "/metrics")[1]
    e0 = read()
    t0 = time.time()
    threads = [threading.Thread(target=client) for _ in range(a.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    e1 = read()
    wall = time.time() - t0
    m1 = http(a.url + "/metrics")[1]

    req_j = sum(u.get("energy_joules", 0.0) for u in results)
    tokens = sum(u.get("completion_tokens", 0) for u in results)
    delta = e1 - e0
    total = metric_sum(m1, "greencode_energy_joules_total") - metric_sum(m0, "greencode_energy_joules_total")
    idle = metric_sum(m1, "greencode_idle_energy_joules_total") - metric_sum(m0, "greencode_idle_energy_joules_total")
    rel = (req_j - delta) / delta if delta > 0 else float("nan")
    out = {
        "check": "serve_energy",
        "requests": len(results),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "sources": sorted({u.get("energy_source") for u in results}),
        "wall_s": wall,
        "completion_tokens": tokens,
        "tokens_per_second": tokens / wall if wall > 0 else None,
        "sum_request_joules": req_j,
        "reference": a.reference,
        "nvml_delta_joules": delta,
        "rel_diff": rel,
        "within_2pct": abs(rel) <= 0.02,
        "metrics_energy_delta_joules": total,
        "metrics_idle_delta_joules": idle,
        "joules_per_token": req_j / tokens if tokens else None,
        "mean_power_watts": delta / wall if wall > 0 else None,
    }
    print(json.dumps(out))
    return 0 if out["within_2pct"] and not errors else 1


if __name__ == "__main__":
    sys.exit(main())
