"""Benchmark `ftlab estimate` on a generated chat file (default 100,000 examples).

    .venv/bin/python scripts/bench_estimate.py [--examples 100000] [--validate]

Writes the file to a temporary folder, runs the estimate (with its progress bar) the way
`ftlab estimate data=custom data.train_file=<file>` does, and prints the wall time. The
target is under 30 s on 2 CPU cores. --validate also times the full validation pass.
"""
import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hydra import compose, initialize_config_dir  # noqa: E402
from rich.console import Console  # noqa: E402

from trainer import preflight  # noqa: E402
from trainer.schema import register_configs  # noqa: E402

CONF = Path(__file__).resolve().parent.parent / "conf"
WORDS = "the a customer order refund shipping coffee beans grinder espresso please thanks JSON email city".split()


def make_file(path: Path, n_examples: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as handle:
        for i in range(n_examples):
            user = " ".join(rng.choices(WORDS, k=rng.randint(10, 60)))
            reply = " ".join(rng.choices(WORDS, k=rng.randint(5, 40)))
            handle.write(json.dumps({"messages": [
                {"role": "system", "content": "You are Brightbean's support assistant."},
                {"role": "user", "content": f"#{i} {user}"},
                {"role": "assistant", "content": reply}]}) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=100_000)
    parser.add_argument("--validate", action="store_true", help="also time the full validation pass")
    args = parser.parse_args()
    console = Console()
    with tempfile.TemporaryDirectory() as tmp:
        train = Path(tmp) / "train.jsonl"
        started = time.perf_counter()
        make_file(train, args.examples)
        console.print(f"generated {args.examples:,} examples ({train.stat().st_size / 2**20:.1f} MB) "
                      f"in {time.perf_counter() - started:.1f} s")
        register_configs()
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose(config_name="config", overrides=[
                "data=custom", f"data.train_file={train}", "data.validation_file=null"])
        started = time.perf_counter()
        code = preflight.estimate(cfg, Path(tmp) / "run", console)
        elapsed = time.perf_counter() - started
        console.print(f"estimate: exit {code}, {elapsed:.1f} s for {args.examples:,} examples "
                      f"({args.examples / elapsed:,.0f} examples/s; target < 30 s)")
        if args.validate:
            started = time.perf_counter()
            code = preflight.validate(cfg, Path(tmp) / "run", Console(quiet=True))
            elapsed = time.perf_counter() - started
            console.print(f"validate: exit {code}, {elapsed:.1f} s for {args.examples:,} examples")


if __name__ == "__main__":
    main()
