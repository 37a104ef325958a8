"""The decoding engine alone (no HTTP): output tokens/s with many concurrent requests over one
backbone and several LoRA adapters, and the KV-cache layout measured against transformers' own.

    .venv/bin/python scripts/bench_engine.py                     # CPU, embedded SmolLM2, fp32, 2 adapters
    .venv/bin/python scripts/bench_engine.py --layouts           # + the KV layout comparison
    python3 scripts/bench_engine.py --device cuda --precision bf16 --backbone llama-3.1-8b-random \\
        --adapters 4 --clients 1,64                              # make gpu-check: 8B shapes, 4 adapters

Each level runs `clients` threads; each submits `--requests` requests one after the other and waits
for each answer. Requests take the models in turn: the backbone alone, then each adapter (random
LoRA adapters of rank 16 on the seven projections, made here with small weights, as trained ones have), so rows of different adapters and
base rows share the batches. Prompts are `--prompt-tokens` random token ids (a request's own seed),
and every request generates exactly `--max-tokens` tokens (no stop token), so the work per request
is fixed. Reported per level: output tokens/s and its ratio to one client, latency p50/p90, the
engine's mean rows per decoding step.

`--layouts` times one decoding step of B rows whose contexts hold `--context` tokens in two KV
layouts: ftlab's slot cache (`trainer.engine.cache`: each row written in place at its own length,
attention over a view), and transformers' DynamicCache on a left-padded batch (what `generate`
uses: each step appends by concatenating every layer's cache). It also times what a row joining
a running batch costs each layout: a copy into a free slot, against re-padding every row's cache.
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
from trainer.openmp import spin_idle_threads  # noqa: E402

spin_idle_threads()  # as `ftlab serve` does: the engine decodes in a thread of its own (trainer/openmp.py)
import torch  # noqa: E402


def load(args):
    """The backbone as ftlab serve loads it, and its config."""
    from trainer.compose import compose
    from trainer.model import load_base_model, resolve_runtime

    cfg = compose([f"backbone={args.backbone}", f"train.device={args.device}", f"train.precision={args.precision}",
                   f"train.quantization={args.quantization}", f"cache_dir={os.path.expanduser(args.cache_dir)}",
                   "logger=none"])
    runtime = resolve_runtime(cfg.train)
    model = load_base_model(cfg, runtime)
    return model.eval(), runtime


def make_adapters(model, count: int, folder: Path) -> list[Path]:
    """`count` random LoRA adapters (rank 16, the seven projections) for `model`, saved under `folder`."""
    from peft import LoraConfig, get_peft_model

    paths = []
    for number in range(count):
        config = LoraConfig(r=16, lora_alpha=32,
                            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
        torch.manual_seed(number)
        peft_model = get_peft_model(model, config)
        with torch.no_grad():  # B starts at zero; a trained adapter's is small, not zero
            for name, parameter in peft_model.named_parameters():
                if "lora_B" in name:
                    parameter.normal_(std=1e-3)
        paths.append(folder / f"adapter{number}")
        peft_model.save_pretrained(str(paths[-1]))
        model = peft_model.unload()  # the bare backbone again
    return paths


def run_level(engine, args, adapters: list, clients: int, vocab: int) -> dict:
    from trainer.engine import Adapter, Request, Sampling

    models = [None] + [Adapter(f"adapter{i}", path) for i, path in enumerate(adapters)]

    def worker(client_no: int) -> list[float]:
        latencies = []
        for request_no in range(args.requests):
            generator = torch.Generator().manual_seed(client_no * 1000 + request_no)
            prompt = torch.randint(0, vocab, (args.prompt_tokens,), generator=generator).tolist()
            request = Request(prompt, Sampling(max_new_tokens=args.max_tokens, temperature=0.0), _NoText(), (),
                              models[(client_no + request_no) % len(models)])
            started = time.perf_counter()
            engine.submit(request, block=True).result()
            latencies.append(time.perf_counter() - started)
        return latencies

    before = dict(engine.stats)
    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        latencies = sorted(x for xs in pool.map(worker, range(clients)) for x in xs)
    wall = time.perf_counter() - started
    steps = engine.stats["steps"] - before["steps"]
    tokens = clients * args.requests * args.max_tokens
    return {"clients": clients, "requests": clients * args.requests, "output_tokens": tokens, "wall_s": wall,
            "output_tokens_per_s": tokens / wall, "latency_p50_s": statistics.median(latencies),
            "latency_p90_s": latencies[min(len(latencies) - 1, int(0.9 * len(latencies)))],
            "rows_per_step": (engine.stats["rows_stepped"] - before["rows_stepped"]) / max(steps, 1)}


class _NoText:
    """A tokenizer stand-in: the bench reads token counts, not text (random weights make no words)."""

    def decode(self, ids, skip_special_tokens=True) -> str:
        return ""


# ---- KV layouts ------------------------------------------------------------------------------
def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.inference_mode()
def time_layouts(model, rows: int, context: int, steps: int, vocab: int) -> dict:
    """ms per decoding step of `rows` rows with `context` tokens each, and ms for one row to join, per layout."""
    from transformers import DynamicCache

    from trainer.engine.cache import SlotCache, decode_mask, extend_mask, extend_positions

    device = next(model.parameters()).device
    prompts = torch.randint(0, vocab, (rows, context), device=device)
    # ftlab's slots: prefill every row into its slot, then decode
    cache = SlotCache(rows + 1)
    lengths = [context] * rows
    span = cache.prepare_extend(list(range(rows)), [0] * rows, lengths)
    positions = extend_positions([0] * rows, lengths, context, device)
    model(input_ids=prompts, position_ids=positions, attention_mask=extend_mask(positions, span), cache=cache,
          use_cache=True, logits_to_keep=1)
    tokens = prompts[:, -1:]
    lengths_t = torch.full((rows,), context, device=device)
    timings = []
    for _ in range(steps + 2):
        _sync(device)
        started = time.perf_counter()
        span = cache.prepare_decode(lengths_t)
        model(input_ids=tokens, position_ids=lengths_t[:, None], attention_mask=decode_mask(lengths_t, span),
              cache=cache, use_cache=True, logits_to_keep=1)
        _sync(device)
        timings.append(time.perf_counter() - started)
        lengths_t = lengths_t + 1
    slot_step = statistics.median(timings[2:])
    _sync(device)
    started = time.perf_counter()
    cache.copy_slot(0, rows, context)  # a row joining: its prefix KV into a free slot
    _sync(device)
    slot_join = time.perf_counter() - started
    # transformers': a left-padded batch in a DynamicCache (all rows the same length here: no padding)
    dynamic = DynamicCache(config=model.config)
    attention = torch.ones((rows, context), dtype=torch.long, device=device)
    model(input_ids=prompts, attention_mask=attention, cache=dynamic, use_cache=True, logits_to_keep=1)
    timings = []
    for _ in range(steps + 2):
        attention = torch.cat([attention, attention[:, :1]], dim=1)
        _sync(device)
        started = time.perf_counter()
        model(input_ids=tokens, attention_mask=attention, cache=dynamic, use_cache=True, logits_to_keep=1)
        _sync(device)
        timings.append(time.perf_counter() - started)
    dynamic_step = statistics.median(timings[2:])
    _sync(device)
    started = time.perf_counter()
    for layer in dynamic.layers:  # a row joining: every row's cache padded by one position, the new row added
        for name in ("keys", "values"):
            tensor = getattr(layer, name)
            padded = torch.nn.functional.pad(tensor, (0, 0, 1, 0))
            setattr(layer, name, torch.cat([padded, padded[:1]], dim=0))
    _sync(device)
    dynamic_join = time.perf_counter() - started
    return {"rows": rows, "context": context, "slot_step_ms": 1000 * slot_step, "dynamic_step_ms": 1000 * dynamic_step,
            "slot_join_ms": 1000 * slot_join, "dynamic_join_ms": 1000 * dynamic_join}


def parse_args(argv=None) -> argparse.Namespace:
    """The command line (see the module)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--backbone", default="smollm2-135m-instruct")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--quantization", default="none", choices=["none", "nf4"], help="nf4: a QLoRA backbone")
    parser.add_argument("--cache-dir", default="~/.cache/ftlab")
    parser.add_argument("--adapters", type=int, default=2, help="random LoRA adapters the requests take in turn")
    parser.add_argument("--clients", default="1,4,16,64")
    parser.add_argument("--requests", type=int, default=2, help="requests per client, one after the other")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument("--layouts", action="store_true", help="also time the KV layouts")
    parser.add_argument("--context", type=int, default=256, help="--layouts: tokens in each row's cache")
    parser.add_argument("--json", default=None, help="results JSON (default benchmarks/results/engine-<device>-<date>.json)")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    """Run the bench; returns the results record (also written as JSON)."""
    args = parse_args(argv)

    from rich.console import Console
    from rich.table import Table

    from trainer.engine import Engine

    model, runtime = load(args)
    vocab = min(model.config.vocab_size, 32000)
    record = {"created": dt.datetime.now().isoformat(timespec="seconds"),
              "command": "scripts/bench_engine.py " + " ".join(sys.argv[1:]), "settings": vars(args)}
    console = Console(width=140)
    if args.layouts:
        rows = [time_layouts(model, batch, args.context, 8, vocab) for batch in (1, 16, 64)]
        table = Table(title=f"KV layouts: one decoding step with {args.context} tokens of context per row "
                            f"({args.backbone}, {args.device}, {args.precision})")
        for column in ["rows", "slots: step ms", "DynamicCache: step ms", "x", "slots: join ms", "DynamicCache: join ms"]:
            table.add_column(column, justify="right")
        for row in rows:
            table.add_row(str(row["rows"]), f"{row['slot_step_ms']:.1f}", f"{row['dynamic_step_ms']:.1f}",
                          f"{row['dynamic_step_ms'] / row['slot_step_ms']:.2f}", f"{row['slot_join_ms']:.2f}",
                          f"{row['dynamic_join_ms']:.2f}")
        console.print(table)
        record["layouts"] = rows
    with tempfile.TemporaryDirectory(prefix="ftlab-bench-engine-") as scratch:
        adapters = make_adapters(model, args.adapters, Path(scratch))
        engine = Engine(model, max_batch_size=args.max_batch_size, max_queue=10_000, max_adapters=args.adapters)
        try:
            run_level(engine, args, adapters, 1, vocab)  # warm-up: loads the adapters
            levels = []
            for clients in [int(c) for c in args.clients.split(",")]:
                levels.append(run_level(engine, args, adapters, clients, vocab))
                print(f"{clients:3d} client(s): {levels[-1]['output_tokens_per_s']:8.1f} output tok/s", flush=True)
        finally:
            engine.close()
    table = Table(title=f"engine: {args.backbone} · {args.device} · {args.precision} · base + {args.adapters} "
                        f"adapters in turn · {args.prompt_tokens} prompt tokens, {args.max_tokens} generated")
    for column in ["clients", "requests", "output tok/s", "x vs 1", "latency p50", "latency p90", "rows per step"]:
        table.add_column(column, justify="right")
    for level in levels:
        level["vs_1_client"] = level["output_tokens_per_s"] / levels[0]["output_tokens_per_s"]
        table.add_row(str(level["clients"]), str(level["requests"]), f"{level['output_tokens_per_s']:.1f}",
                      f"{level['vs_1_client']:.2f}", f"{level['latency_p50_s']:.2f} s", f"{level['latency_p90_s']:.2f} s",
                      f"{level['rows_per_step']:.1f}")
    console.print(table)
    record["levels"] = levels
    from bench import environment

    record |= environment(["torch", "transformers", "peft"], args.device)
    out = Path(args.json) if args.json else REPO / "benchmarks" / "results" / f"engine-{args.device}-{dt.date.today():%Y-%m-%d}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2, default=str) + "\n")
    print(f"results: {out.relative_to(REPO) if out.is_relative_to(REPO) else out}")
    return record


if __name__ == "__main__":
    main()
