"""Soak `palionnx serve`: many keep-alive requests from many clients; the server's memory and dropped requests.

    python benchmarks/serve_soak.py MODEL_DIR --requests 20000 --clients 50 [--tokens 4]

Starts the server in a subprocess on a loopback port; `--clients` threads, each with its own keep-alive
connection pool, send caption requests (one in ten malformed: a 400) until `--requests` are done, pausing
a random 0-7 s now and then so that idle connections meet the server's keep-alive timer. Every 1000
requests it reads the server's resident memory (Linux /proc). Reports requests/s, the answers by status,
requests whose connection was closed with no response, and the RSS curve. Writes
benchmarks/results/serve-soak-MODEL.{json,md}.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from serve_load import start

from palionnx.samples import sample_images
from palionnx.system import cpu_name

RESULTS = Path(__file__).resolve().parent / "results"


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path)
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--tokens", type=int, default=4)
    args = parser.parse_args()

    buffer = io.BytesIO()
    sample_images(1, 40)[0].save(buffer, format="PNG")
    png = buffer.getvalue()
    process, url = start(args.model, None)
    lock = threading.Lock()
    counts: dict[str, int] = {}
    curve: list[tuple[int, float]] = [(0, rss_mb(process.pid))]
    done = 0

    def client(seed: int) -> None:
        nonlocal done
        rng = random.Random(seed)
        with httpx.Client(base_url=url, timeout=120) as http:
            while True:
                with lock:
                    if done >= args.requests:
                        return
                    done += 1
                    number = done
                try:
                    if rng.random() < 0.1:
                        answer = http.post("/v1/caption", json={"image": "data:", "max_new_tokens": args.tokens})
                    else:
                        answer = http.post("/v1/caption", files={"image": ("x.png", png, "image/png")},
                                           data={"max_new_tokens": str(args.tokens)})
                    key = str(answer.status_code)
                except httpx.TransportError as exc:
                    key = f"dropped ({type(exc).__name__})"
                with lock:
                    counts[key] = counts.get(key, 0) + 1
                    if number % 1000 == 0:
                        curve.append((number, rss_mb(process.pid)))
                if rng.random() < 0.002:
                    time.sleep(rng.uniform(0, 7))  # an idle connection, around the keep-alive timer

    started = time.time()
    try:
        with ThreadPoolExecutor(args.clients) as pool:
            list(pool.map(client, range(args.clients)))
    finally:
        seconds = time.time() - started
        process.terminate()
        process.wait(60)
    write_report(args, seconds, counts, curve)


def write_report(args: argparse.Namespace, seconds: float, counts: dict[str, int],
                 curve: list[tuple[int, float]]) -> None:
    """benchmarks/results/serve-soak-MODEL.{json,md}: the answers by status and the server's RSS curve."""
    report = {"cpu": cpu_name(), "model": str(args.model), "requests": args.requests, "clients": args.clients,
              "seconds": seconds, "answers": counts, "rss_mb": curve}
    RESULTS.mkdir(exist_ok=True)
    name = args.model.name
    (RESULTS / f"serve-soak-{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"`palionnx serve {name}`, {args.requests} requests from {args.clients} keep-alive clients "
             f"({cpu_name()}; `python benchmarks/serve_soak.py`), {args.requests / seconds:.0f} requests/s.", "",
             f"Answers: {', '.join(f'{k}: {v}' for k, v in sorted(counts.items()))}.", "",
             "| requests done | server RSS MB |", "| ---: | ---: |"]
    lines += [f"| {n} | {mb:.0f} |" for n, mb in curve]
    (RESULTS / f"serve-soak-{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

if __name__ == "__main__":
    main()
