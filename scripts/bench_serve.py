"""`ftlab serve` under load, beside transformers' own continuous batching: output tokens/s, time to
first token and latency at 1, 4, 16 and 64 concurrent clients, each streaming chat requests with
the official openai client.

    .venv/bin/python scripts/bench_serve.py                       # CPU, embedded SmolLM2 (fp32): ftlab + transformers
    .venv/bin/python scripts/bench_serve.py --train-jobs 1        # clients alternate the family and a fine-tuned model
    .venv/bin/python scripts/bench_serve.py --url http://127.0.0.1:8000/v1 --models <name>   # any running server
    .venv/bin/python scripts/bench_serve.py --report benchmarks/results/<file>.json
    python3 scripts/bench_serve.py --device cuda --backbone llama-3.1-8b-random --train-jobs 4 --clients 64 \\
        --no-transformers                                        # make gpu-check: 8B shapes, 4 adapters

Unless --url is given, `ftlab serve` runs as a process of its own, as users run it, on a scratch
jobs root (and `transformers serve` the same way, after it). `--train-jobs N` first trains N short jobs (`ftlab train`, a few steps of
the bundled sample) into that root, and the clients take the models in turn: the family
(`gpt-3.5-turbo`, the backbone alone) and each `ft:` model, so rows of different adapters and base
rows share the engine's batches. A warm-up request per model loads the backbone and adapters.

Each level runs `clients` threads, each sending `--requests` requests one after the other
(temperature 0, `--max-tokens`, distinct prompts). Reported per level: output tokens/s (completion
tokens from `usage` / wall time) and its ratio to one client, time to first token and latency
(p50/p90). Before the levels, every (model, prompt) pair the levels use is asked once, alone: the
greedy answers at each level are compared with those ("answers unchanged").

Side by side, unless --no-transformers: `transformers serve --continuous-batching` on the same
backbone folder, precision and device, with the same clients (the backbone alone: it serves no
adapters). Both servers run at once, idle while the other is measured: each level runs on one,
then on the other, `--repeats` times over, so a shared machine's drift hits both alike; the table
shows each figure's median. Results go to a JSON under benchmarks/results/ and print as one table.
"""
import argparse
import concurrent.futures
import contextlib
import datetime as dt
import json
import os
import socket
import statistics
import subprocess
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
    return [{"role": "user", "content": f"Write a short story about {TOPICS[(client_no * 7 + request_no) % len(TOPICS)]}."}]


# ---- the servers -----------------------------------------------------------------------------
def serve_overrides(args, root: Path) -> list[str]:
    return [f"jobs_root={root}", f"backbone={args.backbone}", "logger=none", f"train.device={args.device}",
            f"train.precision={args.precision}", f"cache_dir={os.path.expanduser(args.cache_dir)}",
            f"server.max_batch_size={args.max_batch_size}", *args.override]


def start_ftlab(args, root: Path, log_path: Path):
    """`ftlab serve` as a process of its own, as users run it; returns (base_url, stop)."""
    port = _free_port()
    command = [sys.executable, "-m", "trainer", "serve", *serve_overrides(args, root), f"server.port={port}"]
    return _start(command, f"http://127.0.0.1:{port}/v1", f"http://127.0.0.1:{port}/v1/models", log_path,
                  dict(os.environ, PYTHONPATH=str(REPO)))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start(command: list[str], base_url: str, ready_url: str, log_path: Path, env: dict):
    """Start a server process and wait until `ready_url` answers; returns (base_url, stop)."""
    import httpx

    log = open(log_path, "wb")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    deadline = time.time() + 300
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"{command[0]} exited ({process.returncode}); see {log_path}")
        try:
            if httpx.get(ready_url, headers={"Authorization": "Bearer x"}, timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.time() > deadline:
            raise TimeoutError(f"{ready_url} did not answer; see {log_path}")
        time.sleep(0.5)

    def stop():
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()

    return base_url, stop


def train_jobs(args, root: Path, count: int) -> list[str]:
    """Train `count` short jobs into `root` (each its own `ftlab train` process); their ft: names."""
    names = []
    for number in range(count):
        run_dir = root / "jobs" / f"bench-{number}"
        overrides = [f"backbone={args.backbone}", "logger=none", "moderation=off", f"train.device={args.device}",
                     f"train.max_steps={args.train_steps}", f"train.seed={number}", f"suffix=bench{number}",
                     f"cache_dir={os.path.expanduser(args.cache_dir)}", f"hydra.run.dir={run_dir}", *args.train_override]
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "trainer", "train", *overrides], check=True, cwd=REPO,
                       stdout=subprocess.DEVNULL, env=dict(os.environ, PYTHONPATH=str(REPO)))
        names.append(json.loads((run_dir / "job.json").read_text())["fine_tuned_model"])
        print(f"trained {names[-1]} in {time.perf_counter() - started:.0f} s", flush=True)
    return names


def backbone_folder(args) -> Path:
    from hydra import compose, initialize_config_dir

    from trainer.compose import CONFIG_DIR
    from trainer.model import backbone_folder as folder
    from trainer.schema import register_configs

    register_configs()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"backbone={args.backbone}",
                                                       f"cache_dir={os.path.expanduser(args.cache_dir)}"])
    return Path(folder(cfg))


def start_transformers(args, folder: Path, log_path: Path):
    """`transformers serve --continuous-batching` on the backbone folder; returns (base_url, model name, stop)."""
    port = _free_port()
    dtype = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "auto": "float32"}[args.precision]
    device = "cpu" if args.device == "cpu" or (args.device == "auto" and not _cuda()) else "cuda"
    command = [str(Path(sys.executable).parent / "transformers"), "serve", str(folder), "--continuous-batching",
               "--dtype", dtype, "--device", device, "--host", "127.0.0.1", "--port", str(port)]
    base_url, stop = _start(command, f"http://127.0.0.1:{port}/v1", f"http://127.0.0.1:{port}/health", log_path,
                            dict(os.environ, HF_HUB_OFFLINE="1"))
    return base_url, str(folder), stop


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


# ---- the clients -----------------------------------------------------------------------------
def one_request(client, model: str, messages: list[dict], max_tokens: int) -> dict:
    """One streamed chat request: its answer, tokens (from usage), time to first token and latency."""
    started = time.perf_counter()
    first, tokens, text = None, 0, []
    for chunk in client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=max_tokens,
                                                stream=True, stream_options={"include_usage": True}):
        if chunk.choices and chunk.choices[0].delta.content:
            first = first if first is not None else time.perf_counter() - started
            text.append(chunk.choices[0].delta.content)
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return {"seconds": time.perf_counter() - started, "tokens": tokens, "ttft": first, "text": "".join(text)}


def _percentile(values: list[float], share: float):
    values = sorted(v for v in values if v is not None)
    return values[min(len(values) - 1, int(share * len(values)))] if values else None


def run_level(base_url: str, args, models: list[str], clients: int, reference: dict | None) -> dict:
    """`clients` threads, each sending `--requests` requests in turn; client i asks models[i % len(models)]."""
    from openai import OpenAI

    client = OpenAI(base_url=base_url, api_key=args.api_key, max_retries=5, timeout=3600)

    def worker(client_no: int) -> list[dict]:
        model = models[client_no % len(models)]
        return [one_request(client, model, prompt(client_no, n), args.max_tokens) | {"key": (model, client_no, n)}
                for n in range(args.requests)]

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        results = [r for rs in pool.map(worker, range(clients)) for r in rs]
    wall = time.perf_counter() - started
    tokens = sum(r["tokens"] for r in results)
    level = {"clients": clients, "requests": len(results), "completion_tokens": tokens, "wall_s": wall,
             "output_tokens_per_s": tokens / wall, "requests_per_s": len(results) / wall,
             "latency_p50_s": statistics.median(r["seconds"] for r in results),
             "latency_p90_s": _percentile([r["seconds"] for r in results], 0.9),
             "ttft_p50_s": _percentile([r["ttft"] for r in results], 0.5),
             "ttft_p90_s": _percentile([r["ttft"] for r in results], 0.9)}
    if reference is not None:
        same = [r["text"] == reference[_reference_key(*r["key"])] for r in results]
        level["answers_unchanged"] = f"{sum(same)}/{len(same)}"
    return level


def _reference_key(model: str, client_no: int, request_no: int) -> str:
    return f"{model}|{prompt(client_no, request_no)[0]['content']}"


def reference_answers(base_url: str, args, models: list[str], levels: list[int]) -> dict:
    """Every (model, prompt) the levels ask, answered once, alone: the greedy answers to compare with."""
    from openai import OpenAI

    client = OpenAI(base_url=base_url, api_key=args.api_key, max_retries=5, timeout=3600)
    answers = {}
    for client_no in range(max(levels)):
        for request_no in range(args.requests):
            model = models[client_no % len(models)]
            key = _reference_key(model, client_no, request_no)
            if key not in answers:
                answers[key] = one_request(client, model, prompt(client_no, request_no), args.max_tokens)["text"]
    return answers


def warm_up(name: str, base_url: str, args, models: list[str]) -> None:
    """One short request per model: loads the backbone and the adapters."""
    from openai import OpenAI

    client = OpenAI(base_url=base_url, api_key=args.api_key, max_retries=5, timeout=3600)
    started = time.perf_counter()
    for model in models:
        one_request(client, model, prompt(0, 0), 4)
    print(f"{name}: warm-up (loads the model{'s' if len(models) > 1 else ''}) {time.perf_counter() - started:.1f} s",
          flush=True)


def median_level(runs: list[dict]) -> dict:
    """One level's repeats as one: the median of each figure (the repeats kept under `repeats`)."""
    merged = {"clients": runs[0]["clients"], "requests": runs[0]["requests"], "repeats": runs}
    for key in ("output_tokens_per_s", "requests_per_s", "wall_s", "latency_p50_s", "latency_p90_s", "ttft_p50_s",
                "ttft_p90_s"):
        values = [run[key] for run in runs if run.get(key) is not None]
        merged[key] = statistics.median(values) if values else None
    unchanged = [run["answers_unchanged"] for run in runs if "answers_unchanged" in run]
    if unchanged:
        same = sum(int(u.split("/")[0]) for u in unchanged)
        merged["answers_unchanged"] = f"{same}/{sum(int(u.split('/')[1]) for u in unchanged)}"
    return merged


def measure_all(servers: list[dict], args, levels: list[int]) -> list[dict]:
    """Every level on every server, the servers taking turns at each level, `--repeats` times; medians."""
    references = {server["name"]: reference_answers(server["url"], args, server["models"], levels)
                  if not args.no_check else None for server in servers}
    results = {server["name"]: {clients: [] for clients in levels} for server in servers}
    for repeat in range(args.repeats):
        for clients in levels:
            for server in servers:
                level = run_level(server["url"], args, server["models"], clients, references[server["name"]])
                results[server["name"]][clients].append(level)
                print(f"{server['name']} ({repeat + 1}/{args.repeats}): {clients:3d} client(s): "
                      f"{level['output_tokens_per_s']:8.1f} output tok/s, TTFT p50 {level['ttft_p50_s']:.2f} s, "
                      f"latency p50 {level['latency_p50_s']:.2f} s"
                      + (f", answers unchanged {level['answers_unchanged']}" if "answers_unchanged" in level else ""),
                      flush=True)
    runs = []
    for server in servers:
        merged = [median_level(results[server["name"]][clients]) for clients in levels]
        for level in merged:
            level["vs_1_client"] = level["output_tokens_per_s"] / merged[0]["output_tokens_per_s"]
        runs.append({"server": server["name"], "models": server["models"], "levels": merged})
    return runs


# ---- the report ------------------------------------------------------------------------------
def print_table(runs: list[dict], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for column in ["server", "clients", "requests", "output tok/s", "x vs 1", "TTFT p50", "TTFT p90", "latency p50",
                   "latency p90", "answers unchanged"]:
        table.add_column(column, justify="right")
    for run in runs:
        for level in run["levels"]:
            table.add_row(run["server"], str(level["clients"]), str(level["requests"]),
                          f"{level['output_tokens_per_s']:.1f}", f"{level['vs_1_client']:.2f}",
                          *[("-" if level.get(key) is None else f"{level[key]:.2f} s")
                            for key in ("ttft_p50_s", "ttft_p90_s", "latency_p50_s", "latency_p90_s")],
                          level.get("answers_unchanged", "-"))
    Console(width=140).print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--models", default="gpt-3.5-turbo", help="chat models the clients take in turn")
    parser.add_argument("--train-jobs", type=int, default=0, help="train this many short jobs first; their ft: models "
                        "join --models")
    parser.add_argument("--train-steps", type=int, default=4, help="steps of each --train-jobs job")
    parser.add_argument("--train-override", action="append", default=[], help="extra ftlab train override")
    parser.add_argument("--clients", default="1,4,16,64", help="concurrency levels, comma-separated (the first is "
                        "the baseline)")
    parser.add_argument("--requests", type=int, default=2, help="requests per client at each level")
    parser.add_argument("--repeats", type=int, default=3, help="times each level runs on each server, the servers "
                        "taking turns (the table shows medians)")
    parser.add_argument("--max-tokens", type=int, default=32, help="max_tokens of every request")
    parser.add_argument("--max-batch-size", type=int, default=32, help="ftlab serve's server.max_batch_size")
    parser.add_argument("--backbone", default="smollm2-135m-instruct", help="a conf/backbone/ name (in-process server)")
    parser.add_argument("--device", default="auto", choices=["cpu", "cuda", "auto"])
    parser.add_argument("--precision", default="fp32", choices=["auto", "fp32", "bf16", "fp16"])
    parser.add_argument("--cache-dir", default="~/.cache/ftlab")
    parser.add_argument("--override", action="append", default=[], help="extra ftlab serve override (repeatable)")
    parser.add_argument("--url", default=None, help="bench a running server at this base URL instead")
    parser.add_argument("--no-transformers", action="store_true", help="skip transformers serve --continuous-batching")
    parser.add_argument("--no-check", action="store_true", help="skip the one-at-a-time reference answers")
    parser.add_argument("--api-key", default=os.environ.get("FTLAB_API_KEY", "x"))
    parser.add_argument("--json", default=None, help="results JSON (default benchmarks/results/serve-<device>-<date>.json)")
    parser.add_argument("--report", metavar="RESULTS_JSON", help="print a saved run's table and exit")
    args = parser.parse_args()
    if args.report:
        record = json.loads(Path(args.report).read_text())
        print(f"{args.report}: {record['command']}")
        print_table(record["runs"], record["title"])
        return

    levels = [int(c) for c in args.clients.split(",")]
    models = [m for m in args.models.split(",") if m]
    with tempfile.TemporaryDirectory(prefix="ftlab-bench-serve-") as scratch, contextlib.ExitStack() as running:
        servers = []
        if args.url:
            servers.append({"name": args.url, "url": args.url.rstrip("/"), "models": models})
        else:
            root = Path(scratch) / "root"
            models += train_jobs(args, root, args.train_jobs)
            base_url, stop = start_ftlab(args, root, Path(scratch) / "ftlab.log")
            running.callback(stop)
            servers.append({"name": "ftlab", "url": base_url, "models": models})
            if not args.no_transformers:
                base_url, name, stop = start_transformers(args, backbone_folder(args), Path(scratch) / "transformers.log")
                running.callback(stop)
                servers.append({"name": "transformers", "url": base_url, "models": [name]})
        for server in servers:
            warm_up(server["name"], server["url"], args, server["models"])
        runs = measure_all(servers, args, levels)

    from bench import environment  # the same machine and version record as the training bench

    env = environment(["torch", "transformers", "peft", "fastapi", "uvicorn", "openai"], args.device)
    device = "gpu" if env["machine"]["gpu"] and args.device != "cpu" else "cpu"
    title = (f"{args.url or args.backbone} · {device} · {args.precision} · models {', '.join(models)} · max_tokens "
             f"{args.max_tokens} · {args.requests} streamed request(s) per client")
    print_table(runs, title)
    out = Path(args.json) if args.json else REPO / "benchmarks" / "results" / f"serve-{device}-{dt.date.today():%Y-%m-%d}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {"created": dt.datetime.now().isoformat(timespec="seconds"),
              "command": "scripts/bench_serve.py " + " ".join(sys.argv[1:]), "title": title, **env,
              "settings": vars(args), "runs": runs}
    out.write_text(json.dumps(record, indent=2, default=str) + "\n")
    print(f"results: {out.relative_to(REPO) if out.is_relative_to(REPO) else out}")


if __name__ == "__main__":
    main()
