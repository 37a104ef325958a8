"""Benchmark the tokenization cache: a generated chat file tokenized cold, then read back.

    .venv/bin/python scripts/bench_tokenize.py [--examples 20000] [--backbone smollm2-135m-instruct]

Runs what a training job's data stage runs (`trainer.data.cache.tokenize_file`) on a fresh
cache folder twice, then once with the cache off, and prints the seconds side by side and
the ratio. A re-run, a resume and every job of a sweep over the same data take the cached path.
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hydra import compose, initialize_config_dir  # noqa: E402

from scripts.bench_estimate import make_file  # noqa: E402
from trainer.data.cache import tokenize_file  # noqa: E402
from trainer.model import load_tokenizer  # noqa: E402
from trainer.schema import register_configs  # noqa: E402

CONF = Path(__file__).resolve().parent.parent / "conf"


def timed(function, *args):
    started = time.perf_counter()
    result = function(*args)
    return time.perf_counter() - started, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=20_000)
    parser.add_argument("--backbone", default="smollm2-135m-instruct")
    parser.add_argument("--max-length", type=int, default=4096)
    args = parser.parse_args()
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"backbone={args.backbone}"])
    tokenizer = load_tokenizer(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        train, cache = Path(tmp) / "train.jsonl", Path(tmp) / "cache"
        make_file(train, args.examples)
        cold, (dataset, hit_cold) = timed(tokenize_file, train, tokenizer, True, args.max_length, cache)
        warm, (cached, hit_warm) = timed(tokenize_file, train, tokenizer, True, args.max_length, cache)
        off, _ = timed(tokenize_file, train, tokenizer, True, args.max_length, None)
        assert (hit_cold, hit_warm) == (False, True) and cached == dataset
        size = sum(f.stat().st_size for f in (cache / "tokenized").iterdir())
    print(f"{args.examples:,} examples, {dataset.n_tokens:,} tokens ({args.backbone})")
    print(f"{'no cache':>12s} {off:8.2f} s")
    print(f"{'first run':>12s} {cold:8.2f} s   (tokenize + write {size / 2**20:.1f} MiB)")
    print(f"{'cached':>12s} {warm:8.2f} s")
    print(f"cached vs no cache: x{off / warm:.1f} faster")


if __name__ == "__main__":
    main()
