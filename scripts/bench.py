"""ftlab vs TRL's SFTTrainer, side by side: same backbone, data, LoRA, sequence cap, seed, steps.

    .venv/bin/python scripts/bench.py                      # CPU, embedded SmolLM2-135M, ~5 min on 2 cores
    make bench ARGS="--steps 16 --repeats 3"
    .venv/bin/python scripts/bench.py --device cuda --backbone llama-3.1-8b-instruct --quantization nf4 \\
        --max-length 1024 --batch-size 8                   # a GPU: QLoRA, bf16, reports MFU
    python3 scripts/bench.py --device cuda --train qlora --backbone llama-3.1-8b-random --fill-length \\
        --max-length 2048 --batch-size 4 --repeats 1       # make gpu-check: 8B shapes, random weights
    python3 scripts/bench.py --report benchmarks/results/<file>.json   # a saved run's table again

Each (runner, repeat) is its own subprocess, so peak RSS is per run; runners alternate
(A B C, then C B A, ...) so drift on a shared machine hits all of them alike. Runners:

  ftlab          ftlab's own loop (`FineTuningJob.train`) with train.packing=true
  ftlab-padded   the same with train.packing=false (dynamic padding, length-grouped)
  ftlab-compiled the same as ftlab with train.compile=true (compile time included in the timing)
  ftlab-liger    the same as ftlab with train.liger_kernel=true (CUDA: Liger's RMSNorm, RoPE, SwiGLU kernels)
  ftlab-fp32-hidden  the same as ftlab with train.fp32_hidden_states=true (an fp32 residual stream under bf16)
  ftlab-peft-lora    the same as ftlab with train.fused_lora=false (PEFT's own LoRA forward)
  ftlab-unfused  the same as ftlab with train.fused_lora=false and train.fused_rms_norm=false (transformers' own
                 RMSNorm too): what ftlab's fusions (trainer/fused.py) give together
  trl-defaults   SFTTrainer as a user starts it: SFTConfig defaults (gradient checkpointing, bf16 autocast,
                 dynamic padding, random order, loss on every token of the conversation)
  trl-best       SFTTrainer tuned: padding_free=True, no gradient checkpointing, assistant-only loss
                 (SmolLM2's template with {% generation %} markers added; it renders the same text)
  trl-packing    SFTTrainer with packing=True (BFD, padding-free): batch_size rows of max_length tokens each,
                 so each step holds several times more examples than the others

Shared by all: the learning rate (ftlab's 2e-4, not TRL's 2e-5 default, so losses compare), linear
schedule without warmup, AdamW, grad-norm clip 1.0, weight decay 0, LoRA r/alpha/dropout/targets.

Reported per runner (median over repeats): supervised tokens/s (tokens of the trained assistant
replies in the examples each step consumed, counted with ftlab's masks for every runner, so the
unit is the same whatever a trainer puts its loss on), total tokens/s (real tokens, padding
excluded), padding fraction (padding / positions computed), peak RSS (and peak GPU memory), the
last step's training loss as the trainer reports it, and a held-out loss computed the same way
for all: assistant-only mean token loss on the validation file, fp32, after training. The last
line is `speedup X.XX` = ftlab's supervised tokens/s / trl-defaults'.

--fill-length replaces the data with synthetic chat examples that each fill --max-length tokens
(a quarter prompt, the rest reply), so every runner computes the same sequence length: how GPU
throughput and MFU are quoted. MFU counts 4 x parameters FLOPs per token (forward, and backward
through the activations only: the base is frozen) against the card's dense bf16 peak. On a GPU
the table also gives steady-state tokens/s and MFU: from the end of step 2 to the end of the last
step (each step's end taken after the GPU has finished it), leaving out the first steps' CUDA and
cuBLAS set-up, measured the same way for every runner.
"""
import argparse
import datetime as dt
import hashlib
import json
import os
import platform
import random
import resource
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
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

RUNNERS = ["ftlab", "ftlab-padded", "ftlab-compiled", "ftlab-liger", "ftlab-fp32-hidden", "ftlab-peft-lora",
           "ftlab-unfused", "trl-defaults", "trl-best", "trl-packing"]
DEFAULT_RUNNERS = "ftlab,trl-defaults,trl-best"


# ---- shared by every runner ------------------------------------------------------------------
def ftlab_overrides(args, extra: tuple[str, ...] = ()) -> list[str]:
    """The Hydra overrides of these bench settings: what `ftlab train` is given in a whole-process run."""
    overrides = [f"backbone={args.backbone}", f"data={args.data}", "data.validation_file=null", "logger=none",
                 "moderation=off", f"train={args.train}", f"train.batch_size={args.batch_size}",
                 f"train.max_steps={args.steps}", f"train.max_length={args.max_length}", f"train.seed={args.seed}",
                 f"train.device={args.device}", f"train.quantization={args.quantization}",
                 f"train.precision={args.precision}", "train.checkpoint_every=0",
                 f"cache_dir={os.path.expanduser(args.cache_dir)}", *args.override, *extra]
    if getattr(args, "fill_length", False):
        overrides += ["data=custom", f"data.train_file={fill_length_file(hydra_compose(overrides))}"]
    return overrides


def hydra_compose(overrides: list[str]):
    from hydra import compose as compose_config
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from trainer.schema import register_configs

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose_config(config_name="config", overrides=overrides)


def compose(args, extra: tuple[str, ...] = ()):
    """ftlab's composed config for these bench settings (the same one every runner reads its settings from)."""
    return hydra_compose(ftlab_overrides(args, extra))


FILLER_WORDS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa "
                "quebec romeo sierra tango uniform victor whiskey xray yankee zulu the quick brown fox jumps over "
                "lazy dog").split()


def fill_length_file(cfg, n_examples: int = 64) -> Path:
    """Synthetic chat examples of just under `train.max_length` tokens (98%, so no trainer truncates them),
    made once and cached by content."""
    from trainer.data.tokenize import encode_chat
    from trainer.files import write_atomic
    from trainer.model import load_tokenizer

    tokenizer = load_tokenizer(cfg)
    max_length = cfg.train.max_length
    key = hashlib.sha256(f"{cfg.backbone.name}:{len(tokenizer)}:{max_length}:{n_examples}:{cfg.train.seed}".encode())
    path = Path(cfg.cache_dir).expanduser() / "bench" / f"fill-{max_length}-{key.hexdigest()[:12]}.jsonl"
    if path.exists():
        return path
    rng = random.Random(cfg.train.seed)
    words = lambda n: " ".join(rng.choice(FILLER_WORDS) for _ in range(n))  # noqa: E731
    example = lambda prompt, reply: {"messages": [{"role": "user", "content": prompt},  # noqa: E731
                                                  {"role": "assistant", "content": reply}]}
    lines = []
    for _ in range(n_examples):
        prompt = words(8)
        while len(encode_chat(example(prompt + " " + words(8), ""), tokenizer)[0]) < max_length // 4:
            prompt += " " + words(8)
        reply = ""
        while True:
            longer = (reply + " " + words(16)).strip()
            if len(encode_chat(example(prompt, longer), tokenizer)[0]) > max_length * 0.98:  # TRL may tokenize a few more
                break
            reply = longer
        lines.append(json.dumps(example(prompt, reply)))
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, "\n".join(lines) + "\n")
    return path


def reference_data(cfg, tokenizer, split: str):
    """ftlab's tokenization of the data file: the yardstick for supervised tokens and the held-out loss."""
    from trainer.data.jsonl import load_examples
    from trainer.data.tokenize import tokenize_examples
    from trainer.paths import resolve_data_path

    data_cfg = compose_data_cfg(cfg)
    path = resolve_data_path(data_cfg[split])
    return load_examples(path), tokenize_examples(load_examples(path), tokenizer, chat=True,
                                                  max_length=cfg.train.max_length)


def compose_data_cfg(cfg):
    from omegaconf import OmegaConf

    data = OmegaConf.load(REPO / "conf" / "data" / f"{cfg.data.name}.yaml")
    return {"train": cfg.data.train_file, "validation": data.get("validation_file")}


def heldout_loss(model, tokenizer, cfg, device: str) -> float | None:
    """Assistant-only mean token loss on the validation file, fp32, no dropout: the same yardstick for every runner."""
    from trainer.loss import validation_loss

    if not compose_data_cfg(cfg)["validation"]:
        return None
    _, dataset = reference_data(cfg, tokenizer, "validation")
    model.float().eval()  # after peak memory was read
    loss_total, supervised, _ = validation_loss(model, dataset, 8, tokenizer.pad_token_id, device)
    return loss_total / max(supervised, 1)


class TokenCounter:
    """Counts what each consumed batch holds: positions, real tokens, supervised (assistant) tokens, loss tokens."""

    def __init__(self, supervised_by_ids: dict, device: str = "cpu"):
        self.supervised_by_ids = supervised_by_ids
        self.device = device
        self.positions = self.tokens = self.supervised = self.loss_tokens = self.examples = self.unmatched = 0
        self.started = time.perf_counter()
        self.marks: list[tuple[float, int, int]] = []  # (seconds since start, tokens, supervised) at each step's end

    def start(self) -> None:
        self.started = time.perf_counter()

    def mark_step(self) -> None:
        """Note the time at the end of an optimizer step, once the GPU has finished it."""
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()
        self.marks.append((time.perf_counter() - self.started, self.tokens, self.supervised))

    def sequences(self, batch):
        ids = batch["input_ids"].cpu()
        mask = batch.get("attention_mask")
        if mask is not None and mask.dim() == 2:  # padded rows
            for row, row_mask in zip(ids, mask.cpu()):
                yield row[: int(row_mask.sum())].tolist()
        else:  # padding-free / packed rows: split where position_ids restart
            positions = batch["position_ids"].cpu()
            for row, row_positions in zip(ids, positions):
                starts = (row_positions == 0).nonzero().flatten().tolist() + [len(row)]
                for a, b in zip(starts, starts[1:]):
                    yield row[a:b].tolist()

    def add(self, batch) -> None:
        from trainer.data.tokenize import IGNORE_INDEX

        self.positions += batch["input_ids"].numel()
        self.loss_tokens += int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        for sequence in self.sequences(batch):
            if not sequence or all(t == sequence[0] for t in sequence) and tuple(sequence) not in self.supervised_by_ids:
                continue  # a trailing pad segment of a packed row
            self.tokens += len(sequence)
            self.examples += 1
            n = self.supervised_by_ids.get(tuple(sequence))
            if n is None:
                self.unmatched += 1
            self.supervised += n or 0

    def record(self) -> dict:
        return {"positions": self.positions, "tokens": self.tokens, "supervised_tokens": self.supervised,
                "loss_tokens": self.loss_tokens, "examples": self.examples, "unmatched_examples": self.unmatched,
                "step_marks": self.marks}


WARMUP_STEPS = 2  # left out of the steady-state figures: the first steps pay for CUDA/cuBLAS set-up and allocations


def steady_tokens_per_s(run: dict) -> float | None:
    """Tokens per second after the first WARMUP_STEPS optimizer steps (how MFU is usually quoted), or None
    when the run has too few steps to tell."""
    marks = run.get("step_marks") or []
    if len(marks) < WARMUP_STEPS + 2:
        return None
    (t0, tokens0, _), (t1, tokens1, _) = marks[WARMUP_STEPS - 1], marks[-1]
    return (tokens1 - tokens0) / (t1 - t0)


def supervised_lookup(dataset) -> dict:
    from trainer.data.tokenize import IGNORE_INDEX

    return {tuple(e.input_ids): sum(1 for label in e.labels[1:] if label != IGNORE_INDEX) for e in dataset.examples}


def reset_peak_gpu_memory(device: str) -> None:
    """Peak GPU memory is the training loop's: building an 8B model at random passes through bf16 first."""
    if device == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats()


def peak_memory(device: str) -> dict:
    import torch

    out = {"peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if device == "cuda":
        out["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        out["peak_gpu_reserved_mib"] = round(torch.cuda.max_memory_reserved() / 2**20, 1)
    return out


# ---- runners (each in its own process) -------------------------------------------------------
FTLAB_RUNNER_OVERRIDES = {"ftlab": (), "ftlab-padded": ("train.packing=false",),
                          "ftlab-compiled": ("train.compile=true",), "ftlab-liger": ("train.liger_kernel=true",),
                          "ftlab-fp32-hidden": ("train.fp32_hidden_states=true",),
                          "ftlab-peft-lora": ("train.fused_lora=false",),
                          "ftlab-unfused": ("train.fused_lora=false", "train.fused_rms_norm=false")}


def run_ftlab(args, runner: str) -> dict:
    from rich.console import Console

    from trainer.model import load_tokenizer
    from trainer.train import FineTuningJob

    cfg = compose(args, FTLAB_RUNNER_OVERRIDES[runner])
    with tempfile.TemporaryDirectory(prefix="ftlab-bench-") as run_dir:
        job = FineTuningJob(cfg, Path(run_dir), Console(file=open(os.devnull, "w")))
        job.setup()
        tokenizer = load_tokenizer(cfg)
        _, train_ref = reference_data(cfg, tokenizer, "train")
        counter = TokenCounter(supervised_lookup(train_ref), job.runtime.device)
        step = job._optimizer_step

        def counted_step(batch):
            counter.add(batch)
            metrics = step(batch)
            counter.mark_step()
            return metrics

        job._optimizer_step = counted_step
        reset_peak_gpu_memory(job.runtime.device)
        started = time.perf_counter()
        counter.start()
        job.train()
        seconds = time.perf_counter() - started
        memory = peak_memory(job.runtime.device)
        return {"seconds": seconds, "steps": job.step, "final_train_loss": job.results.rows[-1]["train_loss"],
                **counter.record(), **memory,
                "heldout_loss": heldout_loss(job.model, tokenizer, cfg, job.runtime.device),
                "settings": {"packing": bool(cfg.train.packing), "compile": bool(cfg.train.compile),
                             "liger_kernel": bool(cfg.train.liger_kernel),
                             "fp32_hidden_states": bool(cfg.train.fp32_hidden_states),
                             "fused_lora": bool(cfg.train.fused_lora),
                             "fused_rms_norm": bool(cfg.train.fused_rms_norm),
                             "precision": job.runtime.precision_name,
                             "quantization": job.runtime.quantization,
                             "gradient_checkpointing": bool(cfg.train.gradient_checkpointing)}}


GENERATION_TAGGED = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
                     "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                     "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n'}}"
                     "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' + '\n' }}"
                     "{% endgeneration %}{% else %}{{ message['content'] + '<|im_end|>' + '\n' }}{% endif %}"
                     "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def trl_plan(args, variant: str) -> dict:
    """What a TRL run is given, as plain JSON data: model folder, rows, SFTConfig and LoRA settings, tokenizer."""
    from trainer.backbones import has_random_weights
    from trainer.data.jsonl import load_examples
    from trainer.model import backbone_folder, load_tokenizer, resolve_runtime
    from trainer.paths import resolve_data_path

    cfg = compose(args)
    runtime = resolve_runtime(cfg.train)
    tokenizer = load_tokenizer(cfg)
    rows = [{"messages": [{"role": m["role"], "content": m.get("content") or ""} for m in ex["messages"]]}
            for _, ex in load_examples(resolve_data_path(cfg.data.train_file))]
    lora = cfg.lora
    settings = dict(max_length=args.max_length, per_device_train_batch_size=args.batch_size, max_steps=args.steps,
                    seed=args.seed, data_seed=args.seed, learning_rate=cfg.train.base_learning_rate, warmup_steps=0,
                    weight_decay=cfg.optim.weight_decay, max_grad_norm=cfg.train.max_grad_norm, logging_steps=1,
                    save_strategy="no", report_to="none", use_cpu=runtime.device == "cpu", disable_tqdm=True)
    chat_template = tokenizer.chat_template
    if variant == "trl-best":
        # TRL refuses padding_free with a max_length it would not enforce; cap by dropping longer examples instead.
        from trainer.data.tokenize import encode_chat

        rows = [row for row in rows if len(encode_chat(row, tokenizer)[0]) <= args.max_length]
        settings |= dict(padding_free=True, gradient_checkpointing=False, assistant_only_loss=True, max_length=None)
        chat_template = GENERATION_TAGGED
    elif variant == "trl-packing":
        settings |= dict(packing=True, gradient_checkpointing=False)
    return {"model": str(backbone_folder(cfg)), "random_weights": has_random_weights(backbone_folder(cfg)),
            "nf4": runtime.quantization == "nf4", "rows": rows, "settings": settings, "chat_template": chat_template,
            "pad_token": tokenizer.pad_token, "lora": {"r": lora.r, "lora_alpha": lora.alpha, "lora_dropout": lora.dropout,
            "target_modules": list(lora.target_modules or cfg.backbone.lora_target_modules)},
            "overrides": ftlab_overrides(args)}


def trl_trainer(plan: dict):
    """SFTTrainer as the plan says; imports nothing of ftlab unless the weights are random (built as ftlab builds them)."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(plan["model"])
    tokenizer.chat_template, tokenizer.pad_token = plan["chat_template"], plan["pad_token"]
    model, model_init_kwargs = plan["model"], None
    if plan["random_weights"]:
        from trainer.model import load_base_model, resolve_runtime

        cfg = hydra_compose(plan["overrides"])
        model = load_base_model(cfg, resolve_runtime(cfg.train))
    elif plan["nf4"]:
        from transformers import BitsAndBytesConfig

        model_init_kwargs = {"dtype": torch.bfloat16, "quantization_config": BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16)}
    config = SFTConfig(output_dir=tempfile.mkdtemp(prefix="trl-bench-"), model_init_kwargs=model_init_kwargs,
                       **plan["settings"])
    return SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(plan["rows"]),
                      processing_class=tokenizer, peft_config=LoraConfig(task_type="CAUSAL_LM", **plan["lora"]))


def step_marks_callback(counter: TokenCounter):
    """A TrainerCallback that marks the end of each of TRL's optimizer steps in `counter`."""
    from transformers import TrainerCallback

    class StepMarks(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            counter.mark_step()

    return StepMarks()


def run_trl(args, variant: str) -> dict:
    from trainer.model import load_tokenizer, resolve_runtime

    plan = trl_plan(args, variant)
    cfg = compose(args)
    runtime = resolve_runtime(cfg.train)
    _, train_ref = reference_data(cfg, load_tokenizer(cfg), "train")
    trainer = trl_trainer(plan)
    config = trainer.args
    counter = TokenCounter(supervised_lookup(train_ref), runtime.device)
    compute_loss = trainer.compute_loss

    def counted_loss(model, inputs, *a, **kw):
        if model.training:
            counter.add(inputs)
        return compute_loss(model, inputs, *a, **kw)

    trainer.compute_loss = counted_loss
    trainer.add_callback(step_marks_callback(counter))
    reset_peak_gpu_memory(runtime.device)
    started = time.perf_counter()
    counter.start()
    trainer.train()
    seconds = time.perf_counter() - started
    memory = peak_memory(runtime.device)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return {"seconds": seconds, "steps": trainer.state.global_step, "final_train_loss": losses[-1] if losses else None,
            **counter.record(), **memory,
            "heldout_loss": heldout_loss(trainer.model, load_tokenizer(cfg), cfg, runtime.device),
            "settings": {"padding_free": config.padding_free, "packing": config.packing,
                         "gradient_checkpointing": config.gradient_checkpointing, "bf16": config.bf16,
                         "assistant_only_loss": config.assistant_only_loss}}


def trl_process(plan_path: str) -> None:
    """A whole TRL process as a user's script runs it: build the trainer, train, save the adapter."""
    trainer = trl_trainer(json.loads(Path(plan_path).read_text()))
    trainer.train()
    trainer.save_model()


def whole_process(command: list[str], log: Path) -> dict:
    """Wall time and peak RSS of one process from start to exit (its own rusage, not the parent's)."""
    started = time.perf_counter()
    with open(log, "w") as output:
        proc = subprocess.Popen(command, cwd=REPO, stdout=output, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"exit {proc.returncode}: {log.read_text()[-3000:]}")
    return {"process_s": time.perf_counter() - started, "process_peak_rss_mib": round(usage.ru_maxrss / 1024, 1)}


def whole_process_command(args, runner: str, scratch: Path) -> list[str]:
    """The command a user would run for this runner: `ftlab train` with the bench's overrides, or TRL's script."""
    if runner.startswith("ftlab"):
        return [sys.executable, "-m", "trainer", "train", *ftlab_overrides(args, FTLAB_RUNNER_OVERRIDES[runner]),
                f"hydra.run.dir={scratch / 'run'}"]
    plan = scratch / "plan.json"
    plan.write_text(json.dumps(trl_plan(args, runner)))
    return [sys.executable, __file__, "--trl-process", str(plan)]


def child(args) -> None:
    import torch

    torch.manual_seed(args.seed)
    if args.child.startswith("ftlab"):
        result = run_ftlab(args, args.child)
    else:
        result = run_trl(args, args.child)
    Path(args.result).write_text(json.dumps(result))


# ---- the parent: alternate, summarise, save ---------------------------------------------------
def summarise(runner: str, runs: list[dict], n_params: float, device_name: str) -> dict:
    med = lambda key: statistics.median(r[key] for r in runs if r.get(key) is not None)  # noqa: E731
    summary = {
        "runner": runner, "repeats": len(runs),
        "supervised_tokens_per_s": med("supervised_tokens") / med("seconds") if runs else 0.0,
        "supervised_tokens_per_s_runs": [r["supervised_tokens"] / r["seconds"] for r in runs],
        "tokens_per_s": statistics.median(r["tokens"] / r["seconds"] for r in runs),
        "padding_fraction": statistics.median(1 - r["tokens"] / r["positions"] for r in runs),
        "peak_rss_mib": max(r["peak_rss_mib"] for r in runs),
        "final_train_loss": med("final_train_loss"),
        "heldout_loss": med("heldout_loss") if any(r.get("heldout_loss") is not None for r in runs) else None,
        "seconds": med("seconds"), "examples_per_step": med("examples") / max(med("steps"), 1),
        "loss_tokens_per_step": med("loss_tokens") / max(med("steps"), 1),
        "settings": runs[0]["settings"],
    }
    if all("process_s" in r for r in runs):
        summary["process_s"] = statistics.median(r["process_s"] for r in runs)
        summary["process_peak_rss_mib"] = max(r["process_peak_rss_mib"] for r in runs)
    summary["supervised_tokens_per_s"] = statistics.median(summary["supervised_tokens_per_s_runs"])
    steady = [steady_tokens_per_s(r) for r in runs]
    if runs and None not in steady:
        summary["steady_tokens_per_s"] = statistics.median(steady)
    if "peak_gpu_mib" in runs[0]:
        summary["peak_gpu_mib"] = max(r["peak_gpu_mib"] for r in runs)
        from trainer.flops import flops_per_token, gpu_peak_flops

        peak = gpu_peak_flops(device_name)
        if peak and n_params:  # the training loop's FLOP model (trainer/flops.py)
            summary["mfu"] = summary["tokens_per_s"] * flops_per_token(n_params) / peak
            if "steady_tokens_per_s" in summary:
                summary["steady_mfu"] = summary["steady_tokens_per_s"] * flops_per_token(n_params) / peak
    return summary


def print_table(summaries: dict, gpu: bool) -> None:
    """The side-by-side table, then each runner's ratios to trl-defaults (added to its summary)."""
    baseline = summaries.get("trl-defaults")
    print()
    header = (f"{'runner':17s} {'sup tok/s':>9s} {'tok/s':>8s} {'padding':>7s} {'peak RSS':>9s} "
              f"{'train loss':>10s} {'held-out':>8s} {'ex/step':>7s}"
              + ("  peak GPU    MFU | steady: tok/s    MFU" if gpu else "")
              + "  | process: wall  peak RSS")
    print(header)
    for r, s in summaries.items():
        line = (f"{r:17s} {s['supervised_tokens_per_s']:9.1f} {s['tokens_per_s']:8.1f} {s['padding_fraction']:7.1%} "
                f"{s['peak_rss_mib']:7.0f}Mi {s['final_train_loss']:10.4f} {s['heldout_loss'] or float('nan'):8.4f} "
                f"{s['examples_per_step']:7.1f}")
        if "peak_gpu_mib" in s:
            line += (f"  {s['peak_gpu_mib']:7.0f}Mi {s.get('mfu', float('nan')):6.1%} |"
                     f" {s.get('steady_tokens_per_s', float('nan')):13.1f} {s.get('steady_mfu', float('nan')):6.1%}")
        if "process_s" in s:
            line += f"  |      {s['process_s']:6.1f}s {s['process_peak_rss_mib']:7.0f}Mi"
        print(line)
    if baseline:
        print()
        for r, s in summaries.items():
            if r != "trl-defaults":
                s["vs_trl_defaults"] = ratio = {
                    "supervised_tokens_per_s": s["supervised_tokens_per_s"] / baseline["supervised_tokens_per_s"],
                    "tokens_per_s": s["tokens_per_s"] / baseline["tokens_per_s"],
                    "peak_rss": s["peak_rss_mib"] / baseline["peak_rss_mib"],
                } | ({"peak_gpu": s["peak_gpu_mib"] / baseline["peak_gpu_mib"]} if "peak_gpu_mib" in s else {})
                if "steady_tokens_per_s" in s and "steady_tokens_per_s" in baseline:
                    ratio["steady_tokens_per_s"] = s["steady_tokens_per_s"] / baseline["steady_tokens_per_s"]
                if "process_s" in s and "process_s" in baseline:
                    ratio |= {"process_wall": s["process_s"] / baseline["process_s"],
                              "process_peak_rss": s["process_peak_rss_mib"] / baseline["process_peak_rss_mib"]}
                gpu_ratio = f", peak GPU x{ratio['peak_gpu']:.2f}" if "peak_gpu" in ratio else ""
                if "steady_tokens_per_s" in ratio:
                    gpu_ratio += f", steady tok/s x{ratio['steady_tokens_per_s']:.2f}"
                if "process_wall" in ratio:
                    gpu_ratio += (f"; whole process: wall x{ratio['process_wall']:.2f}, "
                                  f"peak RSS x{ratio['process_peak_rss']:.2f}")
                print(f"{r} / trl-defaults: supervised tok/s x{ratio['supervised_tokens_per_s']:.2f}, "
                      f"tok/s x{ratio['tokens_per_s']:.2f}, peak RSS x{ratio['peak_rss']:.2f}{gpu_ratio}")


def report(path: Path) -> dict:
    """Print a saved results JSON's table again (figures for the README); returns the record."""
    record = json.loads(Path(path).read_text())
    machine = record["machine"]
    print(f"{path}: {record['command']}")
    print(f"machine: {machine.get('gpu') or machine['cpu']} · torch {record['versions']['torch']} · "
          f"ftlab {record['ftlab_commit']} · {record['created']}")
    print_table(record["summary"], bool(machine.get("gpu")))
    if "speedup" in record:
        print(f"\nspeedup {record['speedup']:.2f}")
    return record


TRAINING_PACKAGES = ["torch", "transformers", "peft", "trl", "accelerate", "datasets", "bitsandbytes"]


def environment(packages: list[str] = TRAINING_PACKAGES, device: str = "cpu") -> dict:
    """The machine, the package versions and ftlab's commit, for a results JSON."""
    import importlib.metadata as md

    import torch

    versions = {}
    for name in packages:
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = None
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "trainer"], cwd=REPO, capture_output=True, text=True).stdout)
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    machine = {"cpu": cpu, "cores": len(os.sched_getaffinity(0)), "torch_threads": torch.get_num_threads(),
               "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
               "gpu": torch.cuda.get_device_name(0) if device == "cuda" and torch.cuda.is_available() else None}
    return {"machine": machine, "versions": {"python": platform.python_version(), **versions},
            "ftlab_commit": commit + ("+dirty" if dirty else "")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runners", default=DEFAULT_RUNNERS, help=f"comma-separated, from {RUNNERS}")
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per run")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=128, help="sequence cap (tokens per example; TRL's packed row length)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--backbone", default="smollm2-135m-instruct", help="a conf/backbone/ name")
    parser.add_argument("--data", default="json_output", help="a conf/data/ name (chat format)")
    parser.add_argument("--train", default="default", help="a conf/train/ preset (qlora on a GPU)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    parser.add_argument("--quantization", default="none", choices=["none", "nf4", "auto"])
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    parser.add_argument("--cache-dir", default="~/.cache/ftlab")
    parser.add_argument("--override", action="append", default=[], help="extra ftlab override for every runner (repeatable)")
    parser.add_argument("--out", default=None, help="results JSON (default benchmarks/results/<device>-<backbone>-<date>.json)")
    parser.add_argument("--fill-length", action="store_true",
                        help="synthetic examples that each fill --max-length tokens instead of --data")
    parser.add_argument("--report", metavar="RESULTS_JSON", help="print a saved run's table and exit")
    parser.add_argument("--whole-process", action=argparse.BooleanOptionalAction, default=True,
                        help="also time each runner as a whole process, start to exit, as a user runs it")
    parser.add_argument("--trl-process", help=argparse.SUPPRESS)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.report:
        report(Path(args.report))
        return
    if args.child:
        return child(args)
    if args.trl_process:
        return trl_process(args.trl_process)

    runners = [r.strip() for r in args.runners.split(",") if r.strip()]
    unknown = sorted(set(runners) - set(RUNNERS))
    if unknown:
        parser.error(f"unknown runner(s) {unknown}; choose from {RUNNERS}")
    if any(r.startswith("trl") for r in runners):
        try:
            import trl  # noqa: F401
        except ImportError:
            parser.error("TRL is not installed: pip install -e '.[bench]'  (or: make bench)")
    passthrough = [a for a in sys.argv[1:]]
    runs: dict[str, list[dict]] = {r: [] for r in runners}
    failures: dict[str, str] = {}
    for repeat in range(args.repeats):
        order = runners if repeat % 2 == 0 else runners[::-1]
        for runner in order:
            if runner in failures:
                continue
            with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
                result_path = handle.name
            started = time.perf_counter()
            proc = subprocess.run([sys.executable, __file__, *passthrough, "--child", runner, "--result", result_path],
                                  capture_output=True, text=True)
            if proc.returncode != 0:  # the others still run: one broken runner must not cost the whole bench
                sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
                print(f"runner {runner} failed (exit {proc.returncode}); going on without it", flush=True)
                failures[runner] = (proc.stdout[-2000:] + proc.stderr[-6000:]).strip()
                continue
            result = json.loads(Path(result_path).read_text())
            os.unlink(result_path)
            result["process_seconds"] = time.perf_counter() - started
            if args.whole_process:
                with tempfile.TemporaryDirectory(prefix="bench-process-") as scratch:
                    try:
                        result |= whole_process(whole_process_command(args, runner, Path(scratch)),
                                                Path(scratch) / "output.log")
                    except RuntimeError as error:
                        print(f"runner {runner}: whole-process run failed ({error}); going on without it", flush=True)
                        failures[runner + " (whole process)"] = str(error)
            runs[runner].append(result)
            print(f"[{repeat + 1}/{args.repeats}] {runner:17s} {result['supervised_tokens'] / result['seconds']:8.1f} "
                  f"supervised tok/s  {result['seconds']:6.1f} s train  loss {result['final_train_loss']:.4f}  "
                  f"held-out {result['heldout_loss'] or float('nan'):.4f}  rss {result['peak_rss_mib']:.0f} MiB"
                  + (f"  | whole process {result['process_s']:.1f} s, {result['process_peak_rss_mib']:.0f} MiB"
                     if "process_s" in result else ""), flush=True)

    env = environment(TRAINING_PACKAGES, args.device)
    cfg = compose(args)
    device_name = env["machine"]["gpu"] or env["machine"]["cpu"]
    summaries = {r: summarise(r, runs[r], float(cfg.backbone.n_params), device_name) for r in runners if runs[r]}
    print_table(summaries, args.device == "cuda")
    baseline = summaries.get("trl-defaults")
    settings = {k: getattr(args, k) for k in ["steps", "batch_size", "max_length", "repeats", "seed", "backbone", "data",
                                               "train", "device", "quantization", "precision", "override", "fill_length"]}
    settings["learning_rate"] = cfg.train.base_learning_rate
    settings["lora"] = dict(cfg.lora) | {"target_modules": list(cfg.lora.target_modules or cfg.backbone.lora_target_modules)}
    out = Path(args.out) if args.out else (
        REPO / "benchmarks" / "results" / f"{args.device}-{args.backbone.split('-')[0]}-{dt.date.today():%Y-%m-%d}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {"created": dt.datetime.now().isoformat(timespec="seconds"), "command": "scripts/bench.py " + " ".join(sys.argv[1:]),
              **env, "settings": settings, "summary": summaries, "runs": runs, "failures": failures}
    if "ftlab" in summaries and baseline:
        record["speedup"] = summaries["ftlab"]["supervised_tokens_per_s"] / baseline["supervised_tokens_per_s"]
    out.write_text(json.dumps(record, indent=2, default=str) + "\n")
    print(f"\nresults: {out.relative_to(REPO) if out.is_relative_to(REPO) else out}")
    if "speedup" in record:
        print(f"speedup {record['speedup']:.2f}")
    if failures:
        sys.exit(f"runner(s) failed: {', '.join(failures)} (their output is in the results JSON)")


if __name__ == "__main__":
    main()
