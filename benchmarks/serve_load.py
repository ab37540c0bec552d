"""Serving throughput: the batching server vs the same requests as sequential generate calls, one run.

    python benchmarks/serve_load.py [--clients 1 4 16] [--requests 2] [--max-tokens 32] [--threads 2]

A mid-size E2B-like export (benchmarks/common.py) is served on 127.0.0.1 with --max-batch = the largest client
count; N clients (threads with the official openai client) each send `--requests` chat requests one after
another, greedy. The baseline runs the same N x requests prompts through `runtime.generate` one at a time on
one runner. Prints tokens/s, p50/p99 request latency and the served/sequential throughput ratio per N, and
a JSON line.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import torch
from common import MID_E2B, report

from gemma4_compile.export import export_checkpoint
from gemma4_compile.model.checkpoint import write_random_checkpoint
from gemma4_compile.runtime import TextTokenizer, generate, open_runner
from gemma4_compile.runtime.server import bind, make_server
from gemma4_compile.runtime.service import Service


def prompt(i: int) -> list[dict]:
    return [{"role": "user", "content": f"Request {i}: tell me about compiling models, part {i % 7}."}]


def quantiles(samples: list[float]) -> tuple[float, float]:
    q = statistics.quantiles(samples, n=100, method="inclusive") if len(samples) > 1 else samples * 99
    return statistics.median(samples), q[98]


def sequential(export_dir: Path, n: int, max_tokens: int, threads: int) -> dict:
    runner, tok = open_runner(export_dir, threads=threads), TextTokenizer(export_dir)
    latencies, tokens = [], 0
    t0 = time.perf_counter()
    for i in range(n):
        t = time.perf_counter()
        tokens += len(
            generate(
                runner, tok.encode_chat(prompt(i)), max_tokens, stop_ids=tok.defaults.eos_token_ids
            ).tokens
        )
        latencies.append(time.perf_counter() - t)
    return {"seconds": time.perf_counter() - t0, "tokens": tokens, "latencies": latencies}


def served(url: str, model: str, clients: int, requests: int, max_tokens: int) -> dict:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=600, max_retries=0)
    latencies: list[float] = []
    counts: list[int] = []

    def one_client(c: int) -> None:
        for r in range(requests):
            t = time.perf_counter()
            reply = client.chat.completions.create(
                model=model, messages=prompt(c * requests + r), max_tokens=max_tokens, temperature=0
            )
            latencies.append(time.perf_counter() - t)
            counts.append(reply.usage.completion_tokens)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(one_client, range(clients)))
    return {"seconds": time.perf_counter() - t0, "tokens": sum(counts), "latencies": latencies}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--requests", type=int, default=2, help="requests per client, one after another")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt, export_dir = Path(tmp) / "ckpt", Path(tmp) / "export"
        write_random_checkpoint(MID_E2B, ckpt, dtype=torch.float32)
        export_checkpoint(ckpt, export_dir, max_seq_len=128)
        service = Service.open(export_dir, max_batch=max(args.clients), threads=args.threads)
        sock = bind("127.0.0.1", 0)
        server = make_server(service)
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        while not server.started:
            time.sleep(0.05)
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        served(url, service.model_id, 1, 1, 4)  # warm-up
        rows, results = [], {}
        for n in args.clients:
            seq = sequential(export_dir, n * args.requests, args.max_tokens, args.threads)
            srv = served(url, service.model_id, n, args.requests, args.max_tokens)
            ratio = (srv["tokens"] / srv["seconds"]) / (seq["tokens"] / seq["seconds"])
            results[n] = {"ratio": ratio}
            for mode, r in (("sequential", seq), ("served", srv)):
                p50, p99 = quantiles(r["latencies"])
                tps = r["tokens"] / r["seconds"]
                results[n][mode] = {
                    "tokens": r["tokens"],
                    "seconds": r["seconds"],
                    "tokens_per_s": tps,
                    "p50_s": p50,
                    "p99_s": p99,
                }
                rows.append(
                    [n, mode, r["tokens"], r["seconds"], tps, p50, p99, ratio if mode == "served" else 1.0]
                )
        server.should_exit = True
        thread.join(timeout=10)
        service.close()
    report(
        f"chat completions, {args.requests} requests per client, {args.max_tokens} tokens max, greedy "
        f"(mid-size E2B-like, ORT CPU, {args.threads} threads, max batch {max(args.clients)})",
        ["clients", "mode", "tokens", "s", "tok/s", "p50 s", "p99 s", "x seq"],
        rows,
        {
            "benchmark": "serve_load",
            "requests_per_client": args.requests,
            "max_tokens": args.max_tokens,
            "threads": args.threads,
            "results": results,
        },
    )


if __name__ == "__main__":
    main()
