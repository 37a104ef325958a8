"""`ftlab serve` under load: output tokens/s at 1, 4 and 16 concurrent clients, each sending chat requests
with the official openai client.

    .venv/bin/python scripts/bench_serve.py                       # CPU, embedded SmolLM2 as gpt-3.5-turbo
    .venv/bin/python scripts/bench_serve.py --requests 2 --max-tokens 32 --json benchmarks/results/serve-cpu-<date>.json
    .venv/bin/python scripts/bench_serve.py --jobs-root ~/ftlab-jobs --model ft:gpt-3.5-turbo:personal::abc123
    .venv/bin/python scripts/bench_serve.py --url http://127.0.0.1:8000/v1 --model <name>   # any running server
                                                                  # (another ftlab serve, vLLM, …)
    .venv/bin/python scripts/bench_serve.py --report benchmarks/results/<file>.json

Unless --url is given, the server runs in this process (uvicorn in a thread, as `ftlab serve` runs it)
on a free loopback port, with a scratch jobs root unless --jobs-root is given. A warm-up request
loads the backbone (and adapter) before any timing. Each level runs `clients` threads, each sending
`--requests` requests one after the other (temperature 0, `--max-tokens`, distinct prompts); the
figures: output tokens/s (completion tokens from `usage` / wall time), requests/s, latency p50/p90
and, with --stream, time to first token. Ratios are against 1 client. The server answers one
request at a time (one lock around the model), so the ratios show how well it keeps the model
busy, not batching.
"""
import argparse
import concurrent.futures
import datetime as dt
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TOPICS = ["a lighthouse", "a lost key", "the first snow", "a robot gardener", "an old map", "a night train",
          "a quiet library", "a paper boat", "a broken clock", "a desert well", "a city bridge", "a mountain inn",
          "a violin maker", "a winter market", "a river ferry", "a forgotten song"]


def prompt(client_no: int, request_no: int) -> list[dict]:
    topic = TOPICS[(client_no * 7 + request_no) % len(TOPICS)]
    return [{"role": "user", "content": f"Write a short story about {topic}."}]


def start_server(args, root: Path):
    """`ftlab serve` in this process; returns (base_url, stop)."""
    from trainer.serve.app import background_server

    overrides = [f"jobs_root={root}", f"backbone={args.backbone}", "logger=none", f"train.device={args.device}",
                 f"train.precision={args.precision}", f"cache_dir={os.path.expanduser(args.cache_dir)}",
                 *args.override]
    running = background_server(overrides, args.api_key if args.api_key != "x" else None)
    base_url, _ = running.__enter__()
    return base_url, lambda: running.__exit__(None, None, None)


def one_request(client, args, client_no: int, request_no: int) -> dict:
    started = time.perf_counter()
    kwargs = dict(model=args.model, messages=prompt(client_no, request_no), temperature=0, max_tokens=args.max_tokens)
    if args.stream:
        first, tokens = None, 0
        for chunk in client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs):
            if first is None and chunk.choices and chunk.choices[0].delta.content:
                first = time.perf_counter() - started
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
        return {"seconds": time.perf_counter() - started, "tokens": tokens, "ttft": first}
    reply = client.chat.completions.create(**kwargs)
    return {"seconds": time.perf_counter() - started, "tokens": reply.usage.completion_tokens, "ttft": None}


def run_level(base_url: str, args, clients: int) -> dict:
    from openai import OpenAI

    client = OpenAI(base_url=base_url, api_key=args.api_key, max_retries=0, timeout=3600)

    def worker(client_no: int) -> list[dict]:
        return [one_request(client, args, client_no, n) for n in range(args.requests)]

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        results = [r for rs in pool.map(worker, range(clients)) for r in rs]
    wall = time.perf_counter() - started
    latencies = sorted(r["seconds"] for r in results)
    ttfts = sorted(r["ttft"] for r in results if r["ttft"] is not None)
    tokens = sum(r["tokens"] for r in results)
    return {"clients": clients, "requests": len(results), "completion_tokens": tokens, "wall_s": wall,
            "output_tokens_per_s": tokens / wall, "requests_per_s": len(results) / wall,
            "latency_p50_s": statistics.median(latencies),
            "latency_p90_s": latencies[min(len(latencies) - 1, int(0.9 * len(latencies)))],
            "ttft_p50_s": statistics.median(ttfts) if ttfts else None}


def print_table(levels: list[dict], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    base = levels[0]
    table = Table(title=title)
    for column in ["clients", "requests", "tokens", "wall s", "output tok/s", "x vs 1", "req/s", "p50 s", "p90 s",
                   "TTFT p50 s"]:
        table.add_column(column, justify="right")
    for level in levels:
        level["vs_1_client"] = level["output_tokens_per_s"] / base["output_tokens_per_s"]
        table.add_row(str(level["clients"]), str(level["requests"]), str(level["completion_tokens"]),
                      f"{level['wall_s']:.1f}", f"{level['output_tokens_per_s']:.1f}", f"{level['vs_1_client']:.2f}",
                      f"{level['requests_per_s']:.2f}", f"{level['latency_p50_s']:.2f}",
                      f"{level['latency_p90_s']:.2f}",
                      "-" if level["ttft_p50_s"] is None else f"{level['ttft_p50_s']:.2f}")
    Console(width=120).print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--model", default="gpt-3.5-turbo", help="a chat family (the backbone alone) or an ft: name")
    parser.add_argument("--clients", default="1,4,16", help="concurrency levels, comma-separated (the first is the baseline)")
    parser.add_argument("--requests", type=int, default=4, help="requests per client at each level")
    parser.add_argument("--max-tokens", type=int, default=64, help="max_tokens of every request")
    parser.add_argument("--stream", action="store_true", help="stream the replies (and report time to first token)")
    parser.add_argument("--backbone", default="smollm2-135m-instruct", help="a conf/backbone/ name (in-process server)")
    parser.add_argument("--device", default="auto", choices=["cpu", "cuda", "auto"])
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    parser.add_argument("--cache-dir", default="~/.cache/ftlab")
    parser.add_argument("--jobs-root", default=None, help="serve the jobs under this root (default: a scratch root)")
    parser.add_argument("--override", action="append", default=[], help="extra ftlab serve override (repeatable)")
    parser.add_argument("--url", default=None, help="bench a running server at this base URL instead")
    parser.add_argument("--api-key", default=os.environ.get("FTLAB_API_KEY", "x"))
    parser.add_argument("--json", default=None, help="results JSON (default benchmarks/results/serve-<device>-<date>.json)")
    parser.add_argument("--report", metavar="RESULTS_JSON", help="print a saved run's table and exit")
    args = parser.parse_args()
    if args.report:
        record = json.loads(Path(args.report).read_text())
        print(f"{args.report}: {record['command']}")
        print_table(record["levels"], record["title"])
        return

    levels = [int(c) for c in args.clients.split(",")]
    stop = None
    scratch = tempfile.TemporaryDirectory(prefix="ftlab-bench-serve-")
    try:
        if args.url:
            base_url = args.url.rstrip("/")
        else:
            root = Path(args.jobs_root).expanduser() if args.jobs_root else Path(scratch.name) / "root"
            started = time.perf_counter()
            base_url, stop = start_server(args, root)
            print(f"server up in {time.perf_counter() - started:.1f} s at {base_url}", flush=True)
        from openai import OpenAI

        started = time.perf_counter()
        warm = one_request(OpenAI(base_url=base_url, api_key=args.api_key, max_retries=0, timeout=3600), args, 0, 0)
        first_request_s = time.perf_counter() - started
        print(f"warm-up (loads the model): {first_request_s:.1f} s, {warm['tokens']} tokens", flush=True)
        results = []
        for clients in levels:
            result = run_level(base_url, args, clients)
            print(f"{clients:3d} client(s): {result['output_tokens_per_s']:8.1f} output tok/s "
                  f"({result['completion_tokens']} tokens in {result['wall_s']:.1f} s)", flush=True)
            results.append(result)
    finally:
        if stop is not None:
            stop()
        scratch.cleanup()

    from bench import environment  # the same machine and version record as the training bench

    env = environment(["torch", "transformers", "peft", "fastapi", "uvicorn", "openai"], args.device)
    device = "gpu" if env["machine"]["gpu"] and args.device != "cpu" else "cpu"
    title = (f"{args.model} on {args.url or args.backbone} · {device} · max_tokens {args.max_tokens} · "
             f"{args.requests} request(s) per client{' · streamed' if args.stream else ''}")
    print_table(results, title)
    out = Path(args.json) if args.json else REPO / "benchmarks" / "results" / f"serve-{device}-{dt.date.today():%Y-%m-%d}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: getattr(args, k) for k in ["model", "clients", "requests", "max_tokens", "stream", "backbone",
                                               "device", "precision", "override", "url"]}
    record = {"created": dt.datetime.now().isoformat(timespec="seconds"),
              "command": "scripts/bench_serve.py " + " ".join(sys.argv[1:]), "title": title, **env,
              "settings": settings, "first_request_s": first_request_s, "levels": results}
    out.write_text(json.dumps(record, indent=2, default=str) + "\n")
    print(f"results: {out.relative_to(REPO) if out.is_relative_to(REPO) else out}")


if __name__ == "__main__":
    main()
