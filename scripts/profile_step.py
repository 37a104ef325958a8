"""Where one of ftlab's training steps spends its time, by kind of work, from torch.profiler.

    .venv/bin/python scripts/profile_step.py                  # CPU, embedded SmolLM2, the bench's settings
    python3 scripts/profile_step.py --device cuda --train qlora --quantization nf4 --precision bf16 \\
        --backbone llama-3.1-8b-random --fill-length --max-length 2048 --batch-size 4   # make gpu-check

It builds the job as `scripts/bench.py` does (same arguments), trains `--warmup` steps untimed,
then profiles `--steps` more (a JSON, and a bar chart beside it). On a GPU it sums kernel time by kind (matmuls, 4-bit dequantization,
attention, normalisation and other elementwise work, copies and casts, the optimizer) and reports
how busy the GPU was: a step whose kernels fill much less than its wall time is waiting on Python.
On a CPU it sums each operator's own time the same way. Prints a table and writes a JSON.
"""
import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402  (the bench's arguments, config and environment)

# First match wins; names lower-cased. GPU kernel names (cuBLAS/CUTLASS/nvjet GEMMs, bitsandbytes,
# flash/cuDNN attention, Triton, PyTorch's elementwise templates) and CPU operator names alike.
KINDS = [
    ("4-bit dequantize / gemm", r"dequantize|kdequant|gemm_4bit|gemv_4bit"),
    ("attention", r"flash|fmha|attention|sdpa|scaled_dot_product|cudnn_generated"),
    ("optimizer", r"optimizer|adam|multi_tensor|foreach_|_fused_adam"),
    ("matmul", r"gemm|cutlass|nvjet|xmma|cublas|aten::mm$|aten::addmm|aten::bmm|aten::baddbmm|mkldnn_matmul|"
               r"aten::_addmm_activation|matmul"),
    ("cross-entropy / softmax", r"softmax|cross_?entropy|nll_loss|logsumexp"),
    ("norm", r"norm|rsqrt"),
    ("copy / cast", r"copy|cast|memcpy|memset|fill|aten::to$|_to_copy|cat|clone|contiguous"),
    ("elementwise / reduce", r"elementwise|vectorized|reduce|triton|swiglu|silu|rope|"
                             r"aten::(mul|add|sub|div|neg|exp|pow|mean|sum)"),
]


def kind_of(name: str) -> str:
    """The kind of work a kernel or operator name stands for (`other` when none matches)."""
    lowered = name.lower()
    return next((kind for kind, pattern in KINDS if re.search(pattern, lowered)), "other")


def summarise_events(events: list[tuple[str, float, int]], steps: int, wall_s: float, gpu: bool) -> dict:
    """Per step: milliseconds by kind and the top kernels/operators, from (name, microseconds, calls)."""
    by_kind: dict[str, float] = {}
    by_name: dict[str, list] = {}
    for name, us, calls in events:
        by_kind[kind_of(name)] = by_kind.get(kind_of(name), 0.0) + us
        entry = by_name.setdefault(name, [0.0, 0])
        entry[0] += us
        entry[1] += calls
    busy_ms = sum(by_kind.values()) / 1e3 / steps
    step_ms = wall_s * 1e3 / steps
    kinds = {kind: {"ms_per_step": round(us / 1e3 / steps, 3), "share": round(us / 1e3 / steps / busy_ms, 4)}
             for kind, us in sorted(by_kind.items(), key=lambda item: -item[1])}
    top = [{"name": name[:160], "kind": kind_of(name), "ms_per_step": round(us / 1e3 / steps, 3), "calls_per_step": n // steps}
           for name, (us, n) in sorted(by_name.items(), key=lambda item: -item[1][0])[:30]]
    return {"steps": steps, "step_ms": round(step_ms, 2), "busy_ms": round(busy_ms, 2),
            "busy_fraction": round(busy_ms / step_ms, 4), "unit": "GPU kernels" if gpu else "CPU operators (self time)",
            "kinds": kinds, "top": top}


def profiled_events(profiler, gpu: bool) -> list[tuple[str, float, int]]:
    """(name, microseconds, calls) of every GPU kernel, or of each CPU operator's own time."""
    if gpu:
        from torch.autograd import DeviceType

        return [(e.name, e.device_time_total, 1) for e in profiler.events()
                if e.device_type == DeviceType.CUDA and e.device_time_total > 0]
    return [(e.key, e.self_cpu_time_total, e.count) for e in profiler.key_averages() if e.self_cpu_time_total > 0]


def print_summary(summary: dict) -> None:
    print(f"\n{summary['steps']} profiled steps: {summary['step_ms']:.1f} ms a step, {summary['unit']} busy "
          f"{summary['busy_ms']:.1f} ms ({summary['busy_fraction']:.0%})")
    if "gpu_memory" in summary:
        memory = summary["gpu_memory"]
        print(f"GPU memory: {memory['between_steps_mib']:.0f} MiB between steps, {memory['peak_in_step_mib']:.0f} MiB "
              "at the peak of a step")
    print(f"{'kind':26s} {'ms/step':>9s} {'share':>6s}")
    for kind, row in summary["kinds"].items():
        print(f"{kind:26s} {row['ms_per_step']:9.2f} {row['share']:6.1%}")
    print(f"\n{'top kernels' if summary['unit'] == 'GPU kernels' else 'top operators':100s} {'ms/step':>8s} {'calls':>6s}")
    for row in summary["top"][:15]:
        print(f"{row['name'][:100]:100s} {row['ms_per_step']:8.2f} {row['calls_per_step']:6d}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The bench's job arguments, plus how many steps to warm up and to profile."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for flag, default in [("--batch-size", 4), ("--max-length", 128), ("--seed", 42), ("--warmup", 3), ("--steps", 2)]:
        parser.add_argument(flag, type=int, default=default)
    for flag, default in [("--backbone", "smollm2-135m-instruct"), ("--data", "json_output"), ("--train", "default"),
                          ("--device", "cpu"), ("--quantization", "none"), ("--precision", "auto"),
                          ("--cache-dir", "~/.cache/ftlab"), ("--out", None)]:
        parser.add_argument(flag, default=default)
    parser.add_argument("--override", action="append", default=[], help="extra ftlab override (repeatable)")
    parser.add_argument("--fill-length", action="store_true", help="synthetic examples that fill --max-length")
    return parser.parse_args(argv)


def plot_summary(summary: dict, path: Path, title: str) -> Path:
    """The step's time by kind as horizontal bars (milliseconds per step), saved as a PNG."""
    from trainer.plots import plt, save_figure

    kinds = list(summary["kinds"].items())[::-1]  # biggest at the top
    figure, axes = plt.subplots(figsize=(7, 0.45 * len(kinds) + 1.2), dpi=110)
    axes.barh([kind for kind, _ in kinds], [row["ms_per_step"] for _, row in kinds], color="#1f77b4")
    for index, (_, row) in enumerate(kinds):
        axes.annotate(f" {row['share']:.0%}", (row["ms_per_step"], index), va="center", fontsize=8)
    axes.set_xlabel(f"ms per step ({summary['unit']}; a step takes {summary['step_ms']:.0f} ms, "
                    f"{summary['busy_fraction']:.0%} of it busy)")
    axes.set_title(title, fontsize=9)
    axes.grid(axis="x", alpha=0.3)
    return save_figure(figure, path)


def main() -> None:
    args = parse_args()
    args.steps, profiled = args.warmup + args.steps, args.steps  # the job's max_steps covers both

    import torch
    from rich.console import Console
    from torch.profiler import ProfilerActivity, profile

    from trainer.train import FineTuningJob

    cfg = bench.compose(args)
    with tempfile.TemporaryDirectory(prefix="ftlab-profile-") as run_dir:
        job = FineTuningJob(cfg, Path(run_dir), Console(file=open("/dev/null", "w")))
        job.setup()
        gpu = job.runtime.device == "cuda"
        sync = torch.cuda.synchronize if gpu else (lambda: None)
        step, seen = job._optimizer_step, {"n": 0}
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
        profiler = profile(activities=activities)
        clock = {}

        def maybe_profiled_step(batch):
            if seen["n"] == args.warmup:
                sync()
                if gpu:  # what stays between steps (weights, adapter, optimizer), and the peak within one
                    clock["memory"] = {"between_steps_mib": round(torch.cuda.memory_allocated() / 2**20, 1)}
                    torch.cuda.reset_peak_memory_stats()
                profiler.start()
                clock["start"] = time.perf_counter()
            result = step(batch)
            seen["n"] += 1
            if seen["n"] == args.steps:
                sync()
                clock["wall"] = time.perf_counter() - clock["start"]
                profiler.stop()
                if gpu:
                    clock["memory"]["peak_in_step_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
            return result

        job._optimizer_step = maybe_profiled_step
        job.train()
    summary = summarise_events(profiled_events(profiler, gpu), profiled, clock["wall"], gpu)
    if gpu:
        summary["gpu_memory"] = clock["memory"]
    record = {"command": "scripts/profile_step.py " + " ".join(sys.argv[1:]), **bench.environment(device=job.runtime.device),
              "settings": {k: v for k, v in vars(args).items() if k != "out"} | {"steps": profiled}, "profile": summary}
    print_summary(summary)
    out = Path(args.out or bench.REPO / "benchmarks" / "results" / f"profile-{job.runtime.device}-{args.backbone}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1) + "\n")
    plot = plot_summary(summary, out.with_suffix(".png"), f"where a training step's time goes: {args.backbone}, "
                        f"{record['machine']['gpu'] or record['machine']['cpu']}")
    print(f"\nprofile: {out} and {plot}")


if __name__ == "__main__":
    main()
