"""Preference fine-tuning: ftlab's method=dpo against TRL's DPOTrainer with PEFT, side by side in one run.

    python scripts/bench_dpo.py                       # 12 steps each on the embedded SmolLM2, CPU, fp32
    python scripts/bench_dpo.py --precision bf16 --out benchmarks/results/dpo-cpu-bf16-<date>.json

Both train the same LoRA (r 16, alpha 32, the backbone's target modules, no dropout) on the same weights
(ftlab's converted SmolLM2, loaded by ftlab's own loader for both), the same pairs (`data=preference`), beta 0.1,
sigmoid loss, batch 4 pairs, the same learning rate, steps and precision. TRL's reference is also the policy
with its adapter disabled; it computes the reference log-probs at every step (its default), where ftlab
computes them once before training and keeps them with the tokenized data.

Each runner is a process of its own (`--child`), timed by bench_rft's harness: median seconds a step (the
first left out), pairs per second, the whole process's wall time and peak RSS, and the first and last
training loss. `ftlab-two-sequences` is ftlab with each pair as two sequences (`method.dpo.shared_prompt=false`)
rather than one row with its prompt once: what the shared prompt gives.
"""
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_rft  # noqa: E402 - the same harness: arguments, one process a runner, the table

REPO = bench_rft.REPO
PAIRS = REPO / "trainer" / "samples" / "preference"


RUNNERS = ("ftlab", "ftlab-two-sequences", "trl")  # ftlab-two-sequences: method.dpo.shared_prompt=false


def parse_args(argv=None):
    args = bench_rft.parse_args(argv, RUNNERS)
    args.pairs = args.prompts * 2  # pairs a step: --prompts doubles as the batch, 4 by default
    return args


def run_ftlab(args, shared_prompt: bool = True) -> dict:
    from trainer.compose import compose
    from trainer.train import run_training

    cfg = compose([f"backbone={args.backbone}", "method=dpo", "data=preference", "logger=none", "moderation=off",
                   f"train.device={args.device}", f"train.precision={args.precision}", "lora.dropout=0.0",
                   f"train.batch_size={args.pairs}", f"train.max_steps={args.steps}", "train.checkpoint_every=0",
                   f"train.learning_rate_multiplier={args.learning_rate / 2e-4}", f"train.eval_every={10 ** 6}",
                   f"method.dpo.shared_prompt={str(shared_prompt).lower()}",
                   *([f"cache_dir={args.cache_dir}"] if args.cache_dir else [])])
    run_dir = Path(tempfile.mkdtemp(prefix="bench-dpo-ftlab-"))
    if run_training(cfg, run_dir) != 0:
        raise SystemExit(f"ftlab's job failed: see {run_dir}")
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    started = next(e["created_at"] for e in events if e["message"].startswith("Fine-tuning job started"))
    marks = [started] + [e["created_at"] for e in events if e["type"] == "metrics"]
    losses = [e["data"]["train_loss"] for e in events if e["type"] == "metrics"]
    return {"step_seconds": [b - a for a, b in zip(marks, marks[1:])], "losses": losses}


def run_trl(args) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from trainer.compose import compose
    from trainer.model import load_base_model, load_tokenizer, resolve_runtime

    cfg = compose([f"backbone={args.backbone}", f"train.device={args.device}", f"train.precision={args.precision}",
                   *([f"cache_dir={args.cache_dir}"] if args.cache_dir else [])])
    model = load_base_model(cfg, resolve_runtime(cfg.train))
    tokenizer = load_tokenizer(cfg)
    rows = [json.loads(line) for line in (PAIRS / "train.jsonl").read_text().splitlines() if line.strip()]
    data = Dataset.from_list([{"prompt": row["input"]["messages"], "chosen": row["preferred_output"],
                               "rejected": row["non_preferred_output"]} for row in rows])
    marks: list[float] = []

    class StepTimes(TrainerCallback):
        def on_step_begin(self, *a, **k):
            if not marks:
                marks.append(time.perf_counter())

        def on_step_end(self, *a, **k):
            marks.append(time.perf_counter())

    config = DPOConfig(output_dir=tempfile.mkdtemp(prefix="bench-dpo-trl-"), per_device_train_batch_size=args.pairs,
                       max_steps=args.steps, learning_rate=args.learning_rate, beta=0.1, logging_steps=1,
                       report_to="none", save_strategy="no", seed=42, use_cpu=args.device == "cpu",
                       bf16=args.precision == "bf16", gradient_accumulation_steps=1)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=list(cfg.backbone.lora_target_modules),
                      task_type="CAUSAL_LM")
    trainer = DPOTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer, peft_config=lora,
                         callbacks=[StepTimes()])
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return {"step_seconds": [b - a for a, b in zip(marks, marks[1:])], "losses": losses}


def summarise(run: dict, pairs: int) -> dict:
    """The figures of one runner's result."""
    steps = run["step_seconds"][1:] or run["step_seconds"]
    median = statistics.median(steps)
    return {"median_step_s": round(median, 3), "pairs_per_s": round(pairs / median, 3),
            "process_s": round(run["wall_seconds"], 1), "peak_rss_mb": round(run["peak_rss_mb"]),
            "first_loss": round(run["losses"][0], 4), "last_loss": round(run["losses"][-1], 4)}


def main(argv=None) -> int:
    args = parse_args(argv)
    runners = {"ftlab": run_ftlab, "ftlab-two-sequences": lambda args: run_ftlab(args, shared_prompt=False),
               "trl": run_trl}
    if args.child:
        return bench_rft.child_process(args, runners[args.child])
    runs = bench_rft.run_children(args, __file__)
    summaries = {runner: summarise(run, args.pairs) for runner, run in runs.items()}
    print(bench_rft.table(summaries))
    if args.out:
        bench_rft.save(args, summaries, runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
