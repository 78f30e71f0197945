"""Serving throughput: `loraops serve` answering N questions one request at a time vs from 1, 4 and 16
concurrent clients (the server micro-batches what is waiting, adapters mixed in one batch).

It starts `loraops serve` on a free loopback port of the project given (default: this repository, which
must have a registered version — `make run` makes one), sends the same test questions in every arm through
the official `openai` client, and prints requests/s, p50/p95 latency, completion tokens/s and the ratio
to the sequential arm. It checks that every arm gave the same answers (greedy). The last line is
``speedup_16_concurrent: X.XX``.

    python benchmarks/serve_throughput.py
    python benchmarks/serve_throughput.py --requests 64 --model interior-qa-lora@production
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _questions(project: Path, n: int) -> list[str]:
    rows = [json.loads(line) for line in (project / "data/prepared/test.jsonl").read_text(encoding="utf-8").splitlines()]
    unique = list(dict.fromkeys(r["question"] for r in rows))
    return (unique * (n // max(1, len(unique)) + 1))[:n]


def _arm(client, model: str, questions: list[str], clients: int) -> dict:
    def one(q: str) -> tuple[float, str, int]:
        start = time.perf_counter()
        out = client.chat.completions.create(model=model, messages=[{"role": "user", "content": q}])
        return time.perf_counter() - start, out.choices[0].message.content, out.usage.completion_tokens

    start = time.perf_counter()
    if clients == 1:
        results = [one(q) for q in questions]
    else:
        with ThreadPoolExecutor(clients) as pool:
            results = list(pool.map(one, questions))
    wall = time.perf_counter() - start
    latencies = sorted(r[0] for r in results)
    return {"wall": wall, "rps": len(questions) / wall, "p50": statistics.median(latencies) * 1000,
            "p95": latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))] * 1000,
            "tok_s": sum(r[2] for r in results) / wall, "answers": [r[1] for r in results]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project", type=Path, default=ROOT)
    parser.add_argument("--model", default=None, help="served model id (default <registry.model_name>@production)")
    parser.add_argument("--requests", type=int, default=32)
    args = parser.parse_args()

    import yaml
    from openai import OpenAI

    name = yaml.safe_load((args.project / "params.yaml").read_text(encoding="utf-8"))["registry"]["model_name"]
    model = args.model or f"{name}@production"
    port = _free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "LORAOPS_API_KEY": ""}
    log = open(Path(os.environ.get("TMPDIR", "/tmp")) / "serve_throughput.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "loraops.cli", "serve", "--port", str(port), "--queue-size", "256"],
                              cwd=args.project, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=600)
        for _ in range(240):
            try:
                client.models.list()
                break
            except Exception:  # noqa: BLE001 - still starting
                if server.poll() is not None:
                    raise SystemExit(f"loraops serve exited; see {log.name}")
                time.sleep(0.5)
        questions = _questions(args.project, args.requests)
        _arm(client, model, questions[:4], 4)  # warm-up: adapter loaded, first batch compiled
        arms = {c: _arm(client, model, questions, c) for c in (1, 4, 16)}
    finally:
        server.terminate()
        server.wait(30)
    same = all(arms[c]["answers"] == arms[1]["answers"] for c in arms)
    print(f"{args.requests} chat requests to {model}, greedy; every arm the same answers: {same}")
    print(f"| clients | requests/s | p50 ms | p95 ms | completion tokens/s | wall s | vs 1 client |")
    print("|---|---|---|---|---|---|---|")
    for c, r in arms.items():
        print(f"| {c} | {r['rps']:.2f} | {r['p50']:.0f} | {r['p95']:.0f} | {r['tok_s']:.1f} | {r['wall']:.2f} | "
              f"{arms[1]['wall'] / r['wall']:.2f}x |")
    print(f"speedup_16_concurrent: {arms[1]['wall'] / arms[16]['wall']:.2f}")


if __name__ == "__main__":
    main()
