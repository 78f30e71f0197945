"""Serving throughput: `loraops serve` answering N questions one request at a time vs from 1, 4 and 16
concurrent clients (the server micro-batches what is waiting, adapters mixed in one batch).

It starts `loraops serve` on a free loopback port of the project given (default: this repository, which
must have a registered version — `make run` makes one), sends the same test questions in every arm through
the official `openai` client, and prints requests/s, p50/p95 latency, completion tokens/s and the ratio
to the sequential arm. It checks that every arm gave the same answers (greedy); ``speedup_16_concurrent: X.XX``.

Then a mixed load: 8-token requests one after another, alone and while another client's long answer
(``--long-tokens``, 1,000) is generated, on a server whose batches run to the end (``--step-tokens 100000``, the
engine before batches took turns) and on the default one (turns of 8 tokens); the last line is
``short_beside_long_ratio_p50: X.XX`` (beside / alone).

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
from typing import Any

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


def _mixed(client, model: str, questions: list[str], long_tokens: int) -> dict:
    """Short requests (8 tokens) one after another, alone and while a ``long_tokens`` answer is being generated
    for another client: their latencies."""
    import threading

    def short(q: str) -> float:
        start = time.perf_counter()
        client.chat.completions.create(model=model, max_tokens=8, messages=[{"role": "user", "content": q}])
        return time.perf_counter() - start

    alone = sorted(short(q) for q in questions)
    done = threading.Event()

    def long() -> None:
        client.completions.create(model=model, prompt=questions[0], max_tokens=long_tokens, extra_body={"ignore_eos": True})
        done.set()

    thread = threading.Thread(target=long)
    thread.start()
    time.sleep(0.2)
    beside = sorted(short(q) for q in questions)
    finished_first = not done.is_set()
    thread.join()
    pct = lambda xs, q: xs[min(len(xs) - 1, int(q * len(xs)))] * 1000  # noqa: E731
    return {"alone_p50": statistics.median(alone) * 1000, "alone_p95": pct(alone, 0.95),
            "beside_p50": statistics.median(beside) * 1000, "beside_p95": pct(beside, 0.95),
            "before_long_ended": finished_first}


def _serve(project: Path, *flags: str) -> tuple[subprocess.Popen, int, Any]:
    port = _free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "LORAOPS_API_KEY": ""}
    log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"serve_throughput-{port}.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "loraops.cli", "serve", "--port", str(port), "--queue-size", "256",
                               *flags], cwd=project, env=env, stdout=log, stderr=subprocess.STDOUT)
    return server, port, log


def _client(server: subprocess.Popen, port: int, log: Any) -> Any:
    from openai import OpenAI

    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=600)
    for _ in range(240):
        try:
            client.models.list()
            return client
        except Exception:  # noqa: BLE001 - still starting
            if server.poll() is not None:
                raise SystemExit(f"loraops serve exited; see {log.name}")
            time.sleep(0.5)
    raise SystemExit(f"loraops serve did not start; see {log.name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project", type=Path, default=ROOT)
    parser.add_argument("--model", default=None, help="served model id (default <registry.model_name>@production)")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--long-tokens", type=int, default=1000, help="length of the long answer in the mixed load")
    args = parser.parse_args()

    import yaml

    name = yaml.safe_load((args.project / "params.yaml").read_text(encoding="utf-8"))["registry"]["model_name"]
    model = args.model or f"{name}@production"
    server, port, log = _serve(args.project)
    try:
        client = _client(server, port, log)
        questions = _questions(args.project, args.requests)
        _arm(client, model, questions[:4], 4)  # warm-up: adapter loaded, first batch compiled
        arms = {c: _arm(client, model, questions, c) for c in (1, 4, 16)}
    finally:
        server.terminate()
        server.wait(30)
    same = all(arms[c]["answers"] == arms[1]["answers"] for c in arms)
    print(f"{args.requests} chat requests to {model}, greedy; every arm the same answers: {same}")
    print("| clients | requests/s | p50 ms | p95 ms | completion tokens/s | wall s | vs 1 client |")
    print("|---|---|---|---|---|---|---|")
    for c, r in arms.items():
        print(f"| {c} | {r['rps']:.2f} | {r['p50']:.0f} | {r['p95']:.0f} | {r['tok_s']:.1f} | {r['wall']:.2f} | "
              f"{arms[1]['wall'] / r['wall']:.2f}x |")
    print(f"speedup_16_concurrent: {arms[1]['wall'] / arms[16]['wall']:.2f}")

    # mixed load: short requests beside a long answer, whole batches (as before: --step-tokens beyond any answer)
    # against batches that take turns every 8 tokens (the default)
    mixed = {}
    for label, flags in (("whole batches (before)", ("--step-tokens", "100000")), ("turns of 8 tokens (now)", ())):
        server, port, log = _serve(args.project, *flags)
        try:
            client = _client(server, port, log)
            _mixed(client, model, questions[:2], 8)  # warm-up
            mixed[label] = _mixed(client, model, questions[: max(4, args.requests // 4)], args.long_tokens)
        finally:
            server.terminate()
            server.wait(30)
    print(f"\nmixed load: 8-token requests one after another, alone and beside a {args.long_tokens}-token answer")
    print("| engine | alone p50 ms | alone p95 ms | beside p50 ms | beside p95 ms | beside/alone p50 | answered before the long one |")
    print("|---|---|---|---|---|---|---|")
    for label, r in mixed.items():
        print(f"| {label} | {r['alone_p50']:.0f} | {r['alone_p95']:.0f} | {r['beside_p50']:.0f} | {r['beside_p95']:.0f} | "
              f"{r['beside_p50'] / r['alone_p50']:.2f}x | {r['before_long_ended']} |")
    now = mixed["turns of 8 tokens (now)"]
    print(f"short_beside_long_ratio_p50: {now['beside_p50'] / now['alone_p50']:.2f}")


if __name__ == "__main__":
    main()
