"""Load on `palionnx serve`: throughput and latency at 1, 8 and 32 concurrent clients.

    python benchmarks/serve_load.py MODEL_DIR [--clients 1 8 32] [--requests 64] [--tokens 32] [--slots N]
                                    [--stream] [--name NAME]

Starts the server in a subprocess on a loopback port, then for each client count sends `--requests`
caption requests (each client one at a time, all clients at once) and reports requests/s, p50/p99 latency
and the server's slot occupancy. With `--stream` the clients stream (`stream=true`) and the table adds the
inter-token latency they see: the gaps between consecutive text events of one caption (its first event,
which waits for the prefill, left out), p50 and p99 over all of a row's captions. With `--spread` request i
asks for between TOKENS/2 and 3 TOKENS/2 new tokens (random weights never stop early): captions end at
different steps and newcomers join while the others decode, as captions of varied lengths make them. Writes
benchmarks/results/serve-load-NAME.{json,md} (NAME: the model folder's name unless given).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
from compare import cpu_model

from palionnx.samples import sample_images

RESULTS = Path(__file__).resolve().parent / "results"


def start(model: Path, slots: int | None) -> tuple[subprocess.Popen, str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    args = [sys.executable, "-m", "palionnx", "serve", str(model), "--port", str(port), "--timeout", "600"]
    process = subprocess.Popen(args + (["--slots", str(slots)] if slots else []), stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(url + "/healthz").status_code == 200:
                return process, url
        except httpx.TransportError:
            time.sleep(0.1)
    process.kill()
    raise RuntimeError(process.stderr.read() if process.stderr else "the server did not start")


def slot_counters(url: str) -> dict[str, float]:
    """The server's slot count, decode steps and busy slot-steps so far (from /metrics)."""
    wanted = ("palionnx_slots ", "palionnx_decode_steps_total ", "palionnx_busy_slot_steps_total ")
    lines = httpx.get(url + "/metrics").text.splitlines()
    return {name.strip(): float(line.split()[1]) for line in lines for name in wanted if line.startswith(name)}


def load(url: str, clients: int, requests: int, tokens: int, pngs: list[bytes], stream: bool = False,
         spread: bool = False) -> dict:
    gaps: list[float] = []

    def one(i: int) -> float:
        started = time.perf_counter()
        files = {"image": ("x.png", pngs[i % len(pngs)], "image/png")}
        wanted = tokens // 2 + (i * 7919) % (tokens + 1) if spread else tokens
        data = {"max_new_tokens": str(wanted), **({"stream": "true"} if stream else {})}
        with httpx.stream("POST", url + "/v1/caption", files=files, data=data, timeout=600) as answer:
            answer.raise_for_status()
            arrivals = [time.perf_counter() for line in answer.iter_lines() if line.startswith('data: {"delta"')]
        gaps.extend(np.diff(arrivals).tolist())
        return time.perf_counter() - started

    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(one, range(clients)))  # warm-up round, excluded
        gaps.clear()
        before = slot_counters(url)
        started = time.perf_counter()
        latencies = list(pool.map(one, range(requests)))
        wall = time.perf_counter() - started
    after = slot_counters(url)
    steps = after["palionnx_decode_steps_total"] - before["palionnx_decode_steps_total"]
    busy = after["palionnx_busy_slot_steps_total"] - before["palionnx_busy_slot_steps_total"]
    return {"clients": clients, "requests": requests, "requests_per_s": requests / wall,
            "p50_s": float(np.percentile(latencies, 50)), "p99_s": float(np.percentile(latencies, 99)),
            "occupancy": busy / (steps * after["palionnx_slots"]) if steps else 0.0,
            **({"token_gap_p50_ms": 1000 * float(np.percentile(gaps, 50)),
                "token_gap_p99_ms": 1000 * float(np.percentile(gaps, 99))} if gaps else {})}


def markdown(args: argparse.Namespace, rows: list[dict], machine: str) -> list[str]:
    """The results as a markdown table (with the inter-token columns when the clients streamed)."""
    streamed = args.stream
    lines = [f"`palionnx serve {args.model.name}`, {args.tokens} new tokens per request, {args.requests} requests "
             f"per row{' (TOKENS/2 to 3 TOKENS/2: --spread)' if args.spread else ''}, slots {args.slots or 'default'}"
             f"{', streaming' if streamed else ''}. Machine: {machine}.", "",
             "| clients | requests/s | p50 s | p99 s | slot occupancy |" + (" token gap p50 ms | p99 ms |" * streamed),
             "| ---: | ---: | ---: | ---: | ---: |" + (" ---: | ---: |" * streamed)]
    for r in rows:
        gaps = f" {r['token_gap_p50_ms']:.0f} | {r['token_gap_p99_ms']:.0f} |" if "token_gap_p50_ms" in r else ""
        lines.append(f"| {r['clients']} | {r['requests_per_s']:.2f} | {r['p50_s']:.2f} | {r['p99_s']:.2f} | "
                     f"{r['occupancy']:.0%} |" + gaps)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--slots", type=int)
    parser.add_argument("--stream", action="store_true", help="streaming clients; adds inter-token latency")
    parser.add_argument("--spread", action="store_true", help="vary the new tokens per request (see above)")
    parser.add_argument("--name", help="the results' name (default: the model folder's)")
    args = parser.parse_args()
    pngs = []
    for image in sample_images(8, size=224):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        pngs.append(buffer.getvalue())
    process, url = start(args.model, args.slots)
    try:
        rows = []
        for clients in args.clients:
            rows.append(load(url, clients, args.requests, args.tokens, pngs, args.stream, args.spread))
            print(rows[-1], flush=True)
    finally:
        process.terminate()
        process.wait(60)
    machine = f"{cpu_model()}, {len(os.sched_getaffinity(0))} cores"
    table = markdown(args, rows, machine)
    RESULTS.mkdir(exist_ok=True)
    stem = f"serve-load-{args.name or args.model.name}"
    (RESULTS / f"{stem}.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2, default=str) + "\n")
    (RESULTS / f"{stem}.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))


if __name__ == "__main__":
    main()
