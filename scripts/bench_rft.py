"""Reinforcement fine-tuning: ftlab's method=reinforcement against TRL's GRPOTrainer, side by side in one run.

    python scripts/bench_rft.py                      # 12 steps each on the embedded SmolLM2, CPU, fp32
    python scripts/bench_rft.py --steps 24 --out benchmarks/results/rft-cpu-<date>.json

Both train the same LoRA (r 16, alpha 32, the backbone's target modules, no dropout) on the same backbone
weights (ftlab's converted SmolLM2 folder, loaded by ftlab's own loader for both), with the same prompts
(`data=rft`: trainer/samples/rft/train.jsonl), the same reward (the sample's multi grader for ftlab; the
same formula as a Python callable for TRL: 0.6 × the reference answer in the reply, ignoring case, + 0.4 ×
brevity), G samples a prompt, prompts a step, new tokens, temperature 1, no KL term, the same learning rate
and loss (each reply's tokens averaged, then the replies: TRL's `loss_type="grpo"`), and the same precision
(`--precision fp32`, the default, or `bf16`: the backbone's weights in bf16 for both, and TRL's `bf16=True`).

Each runner is a process of its own (`--child ftlab|trl`), so its peak RSS is its own (ru_maxrss; for
ftlab the python grader's sandbox processes are children, reported apart). Reported per runner: the median
wall time of a step (the first left out), steps per second, the whole process's wall time, peak RSS, the
mean training reward of the first and the last 3 steps, and the held-out reward after training: one greedy
reply to each validation prompt (trainer/samples/rft/validation.jsonl), scored with the same reward.
"""
import argparse
import datetime as dt
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "trainer" / "samples" / "rft"
RUNNERS = ("ftlab", "trl")


def parse_args(argv=None, runners: tuple[str, ...] = RUNNERS) -> argparse.Namespace:
    """The settings shared by the RFT and DPO benches; `runners` are the script's (ftlab's first, TRL's last)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--prompts", type=int, default=2, help="prompts a step")
    parser.add_argument("--group", type=int, default=8, help="samples a prompt (G)")
    parser.add_argument("--max-new-tokens", type=int, default=20)
    parser.add_argument("--learning-rate", type=float, default=2e-4)
    parser.add_argument("--backbone", default="smollm2-135m-instruct", help="an ftlab backbone config")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--runners", default=",".join(runners))
    parser.add_argument("--cache-dir", default=None, help="ftlab's cache (converted backbones); default: its own")
    parser.add_argument("--out", default=None, help="where to keep the JSON (default: print only)")
    parser.add_argument("--child", choices=runners, help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def reward(text: str, reference: str) -> float:
    """The data=rft grader as a Python callable: 0.6 × right (ilike) + 0.4 × short."""
    words = len(text.split())
    return 0.6 * float(reference.lower() in text.lower()) + 0.4 * max(0.0, min(1.0, (32 - words) / 24))


def lines(name: str) -> list[dict]:
    return [json.loads(line) for line in (SAMPLES / name).read_text().splitlines() if line.strip()]


def messages(line: dict) -> list[dict]:
    return [m | {"role": "system"} if m["role"] == "developer" else m for m in line["messages"]]


def compose(args, extra=()):
    from trainer.compose import compose as ftlab_compose

    return ftlab_compose([f"backbone={args.backbone}", "method=reinforcement", "data=rft", "logger=none",
                          f"train.device={args.device}", f"train.precision={args.precision}", "moderation=off",
                          *([f"cache_dir={args.cache_dir}"] if args.cache_dir else []), *extra])


# ---- the runners (each in a process of its own) ---------------------------------------------------
def run_ftlab(args) -> dict:
    from trainer.train import run_training

    multiplier = args.learning_rate / 2e-4  # method.reinforcement.base_learning_rate
    cfg = compose(args, [f"train.batch_size={args.prompts}", f"train.max_steps={args.steps}",
                         f"method.reinforcement.group_size={args.group}",
                         f"method.reinforcement.max_new_tokens={args.max_new_tokens}",
                         f"method.reinforcement.eval_interval={args.steps}", "lora.dropout=0.0",
                         f"train.learning_rate_multiplier={multiplier}", "train.checkpoint_every=0"])
    run_dir = Path(tempfile.mkdtemp(prefix="bench-rft-ftlab-"))
    code = run_training(cfg, run_dir)
    if code != 0:
        raise SystemExit(f"ftlab's job failed: see {run_dir}")
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    started = next(e["created_at"] for e in events if e["message"].startswith("Fine-tuning job started"))
    marks = [started] + [e["created_at"] for e in events if e["type"] == "metrics"]
    rows = [e["data"] for e in events if e["type"] == "metrics"]
    return {"step_seconds": [b - a for a, b in zip(marks, marks[1:])],
            "train_rewards": [row["train_reward_mean"] for row in rows],
            "heldout_reward": rows[-1]["valid_reward_mean"],
            "children_peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}


def run_trl(args) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from trainer.model import load_base_model, load_tokenizer, resolve_runtime

    cfg = compose(args)
    model = load_base_model(cfg, resolve_runtime(cfg.train))
    tokenizer = load_tokenizer(cfg)
    train = Dataset.from_list([{"prompt": messages(line), "reference_answer": line["reference_answer"]}
                               for line in lines("train.jsonl")])

    def reward_function(completions, reference_answer, **kwargs):
        return [reward(c[0]["content"] if isinstance(c, list) else c, r) for c, r in zip(completions, reference_answer)]

    marks: list[float] = []

    class StepTimes(TrainerCallback):
        def on_step_begin(self, *a, **k):
            if not marks:
                marks.append(time.perf_counter())

        def on_step_end(self, *a, **k):
            marks.append(time.perf_counter())

    config = GRPOConfig(output_dir=tempfile.mkdtemp(prefix="bench-rft-trl-"), per_device_train_batch_size=args.prompts
                        * args.group, num_generations=args.group, max_completion_length=args.max_new_tokens,
                        max_steps=args.steps, learning_rate=args.learning_rate, beta=0.0, temperature=1.0,
                        loss_type="grpo", logging_steps=1, report_to="none", save_strategy="no", seed=42,
                        use_cpu=args.device == "cpu", bf16=args.precision == "bf16", gradient_accumulation_steps=1)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=list(cfg.backbone.lora_target_modules),
                      task_type="CAUSAL_LM")
    trainer = GRPOTrainer(model=model, reward_funcs=reward_function, args=config, train_dataset=train,
                          processing_class=tokenizer, peft_config=lora, callbacks=[StepTimes()])
    trainer.train()
    rewards = [entry["reward"] for entry in trainer.state.log_history if "reward" in entry]
    held = lines("validation.jsonl")
    trained = trainer.model.eval()
    scores = []
    with torch.no_grad():
        for line in held:
            ids = tokenizer.apply_chat_template(messages(line), add_generation_prompt=True, return_tensors="pt",
                                                return_dict=True)
            out = trained.generate(**ids, max_new_tokens=args.max_new_tokens, do_sample=False)
            text = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
            scores.append(reward(text, line["reference_answer"]))
    return {"step_seconds": [b - a for a, b in zip(marks, marks[1:])], "train_rewards": rewards,
            "heldout_reward": sum(scores) / len(scores)}


def child_process(args, runner) -> int:
    """In a runner's own process: run it, and leave its result, time and peak RSS in `args.result`."""
    started = time.perf_counter()
    result = runner(args)
    result |= {"runner": args.child, "process_seconds": time.perf_counter() - started,
               "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    Path(args.result).write_text(json.dumps(result))
    return 0


def run_children(args, script: str) -> dict:
    """Each runner of `args.runners` as a process of its own running `script --child <runner>`, one after the
    other; their results, with the whole process's wall time."""
    runs = {}
    env = os.environ | {"HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "TRANSFORMERS_OFFLINE": "1"}
    for runner in args.runners.split(","):
        with tempfile.NamedTemporaryFile(suffix=".json") as result:
            command = [sys.executable, script, "--child", runner, "--result", result.name, *child_arguments(args)]
            started = time.perf_counter()
            print(f"running {runner}…", flush=True)
            subprocess.run(command, check=True, env=env, cwd=REPO)
            runs[runner] = json.loads(Path(result.name).read_text()) | {"wall_seconds": time.perf_counter() - started}
    return runs


def save(args, summaries: dict, runs: dict) -> None:
    """The run's JSON at `args.out`: when, the arguments, the machine, the figures and the raw results."""
    import torch

    report = {"created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "args": {k: v for k, v in vars(args).items() if k not in ("child", "result", "out")},
              "environment": {"python": platform.python_version(), "torch": torch.__version__,
                              "cpu_count": os.cpu_count(), "machine": platform.machine()},
              "summaries": summaries, "runs": runs}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")


# ---- the parent ----------------------------------------------------------------------------------
def summarise(run: dict) -> dict:
    """The figures of one runner's result."""
    steps = run["step_seconds"][1:] or run["step_seconds"]
    median = statistics.median(steps)
    rewards = run["train_rewards"]
    return {"median_step_s": round(median, 3), "steps_per_s": round(1 / median, 4),
            "process_s": round(run["wall_seconds"], 1), "peak_rss_mb": round(run["peak_rss_mb"]),
            "first3_reward": round(statistics.mean(rewards[:3]), 4), "last3_reward": round(statistics.mean(rewards[-3:]), 4),
            "heldout_reward": round(run["heldout_reward"], 4)}


def table(summaries: dict) -> str:
    """The figures side by side, with the ratios of the first runner to the last (ftlab / TRL)."""
    runners = list(summaries)
    keys = list(summaries[runners[0]])
    width = max(12, *(len(r) + 2 for r in runners))
    compared = len(runners) >= 2
    out = [f"{'':<16}" + "".join(f"{r:>{width}}" for r in runners)
           + (f"{runners[0] + '/' + runners[-1]:>{width + 3}}" if compared else "")]
    for key in keys:
        values = [summaries[r][key] for r in runners]
        ratio = f"{values[0] / values[-1]:>{width + 3}.2f}" if compared and values[-1] else ""
        out.append(f"{key:<16}" + "".join(f"{v:>{width}}" for v in values) + ratio)
    return "\n".join(out)


def child_arguments(args) -> list[str]:
    """The parent's settings as a child's command line."""
    words = []
    for key in ("steps", "prompts", "group", "max_new_tokens", "learning_rate", "backbone", "precision", "device",
                "cache_dir"):
        value = getattr(args, key)
        if value is not None:
            words += [f"--{key.replace('_', '-')}", str(value)]
    return words


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        return child_process(args, {"ftlab": run_ftlab, "trl": run_trl}[args.child])
    runs = run_children(args, __file__)
    summaries = {runner: summarise(run) for runner, run in runs.items()}
    print(table(summaries))
    if args.out:
        save(args, summaries, runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
