"""The GPU path (make gpu-check): QLoRA on a small Llama with Llama-3.1-8B's layout, random weights
built on the GPU. Each test is skipped without CUDA.

FTLAB_GPU_TEST_DEVICE=cpu runs the same tests on CPU (NF4 through bitsandbytes' CPU kernels, plain
AdamW), to check the tests themselves before a GPU is lent; CI does not, for time.
"""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from tests.conftest import chat_example, kill_after_checkpoint, write_jsonl
from trainer.compose import CONFIG_DIR
from trainer.schema import register_configs

DEVICE = os.environ.get("FTLAB_GPU_TEST_DEVICE", "cuda")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
# Llama-3.1-8B's layout (GQA, SwiGLU, llama3 RoPE) at a size that trains in seconds.
SMALL_LLAMA = ["backbone=llama-3.1-8b-random", "backbone.load.architecture.hidden_size=256",
               "backbone.load.architecture.intermediate_size=768", "backbone.load.architecture.num_hidden_layers=4",
               "backbone.load.architecture.num_attention_heads=8", "backbone.load.architecture.num_key_value_heads=2",
               "backbone.load.architecture.vocab_size=2048"]


def qlora_args(train_file: Path, cache_dir: str, *extra: str, preset: str = "qlora") -> list[str]:
    """Overrides for a QLoRA job (train=qlora: NF4 + double quantization, bf16, paged 8-bit AdamW) on the small Llama."""
    device = [] if DEVICE == "cuda" else ["train.device=cpu"]
    return [f"train={preset}", *SMALL_LLAMA, *device, "logger=none", "moderation=off", "data=custom",
            f"data.train_file={train_file}", "lora.dropout=0.0", f"cache_dir={cache_dir}", *extra]


def compose_job(*overrides: str):
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


@pytest.fixture
def train_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "train.jsonl", [chat_example(f"Spell {i} in words, please", f"number {i} " * 3)
                                                  for i in range(40)])


def base_weights(model) -> dict[str, torch.Tensor]:
    """Copies of every frozen weight: the packed NF4 bytes, their scales, and the unquantized rest."""
    import bitsandbytes as bnb

    copies = {}
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            copies[name + ".weight"] = module.weight.data.clone()
            copies[name + ".absmax"] = module.weight.quant_state.absmax.clone()
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad and "lora_" not in name and name not in copies:
            copies[name] = parameter.detach().clone()
    return copies


def test_qlora_trains_on_a_fixed_batch_and_leaves_the_base_unchanged(tmp_path, cache_dir, train_file):
    import bitsandbytes as bnb

    from trainer.data.tokenize import batches_for_epoch
    from trainer.train import FineTuningJob

    cfg = compose_job(*qlora_args(train_file, cache_dir, "train.batch_size=8", "train.max_steps=12",
                                  "scheduler.warmup_ratio=0", "train.learning_rate_multiplier=5"))
    job = FineTuningJob(cfg, tmp_path / "run")
    job.setup()
    quantized = [m for m in job.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantized) == 4 * 7  # every projection of every layer, not the LM head
    state = quantized[0].weight.quant_state
    assert state.quant_type == "nf4" and state.nested  # NF4 with double quantization
    assert quantized[0].compute_dtype == torch.bfloat16 and job.runtime.dtype == torch.bfloat16
    if DEVICE == "cuda":
        assert isinstance(job.optimizer, bnb.optim.PagedAdamW8bit)
        assert next(job.model.parameters()).is_cuda
    before = base_weights(job.model)
    batch = next(iter(batches_for_epoch(job.train_data, 8, 0, 0, job.tokenizer.pad_token_id)))
    losses = [job._optimizer_step(batch)[0] for _ in range(12)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.8 * losses[0], losses  # the fixed batch is being learned
    after = base_weights(job.model)
    assert before.keys() == after.keys() and len(before) > 4 * 7 * 2
    changed = [name for name in before if not torch.equal(before[name], after[name])]
    assert not changed, f"frozen weights moved: {changed[:5]}"


def test_the_saved_adapter_reloads_to_the_same_logits(tmp_path, cache_dir, train_file):
    from trainer.data.tokenize import batches_for_epoch, model_inputs
    from trainer.model import load_for_inference
    from trainer.train import FineTuningJob

    cfg = compose_job(*qlora_args(train_file, cache_dir, "train.batch_size=8", "train.max_steps=6",
                                  "train.learning_rate_multiplier=5"))
    job = FineTuningJob(cfg, tmp_path / "run")
    job.setup()
    job.train()
    adapter = job.save_adapter()
    batch = next(iter(batches_for_epoch(job.train_data, 4, 0, 0, job.tokenizer.pad_token_id)))
    runtime = job.runtime
    inputs = {k: v.to(runtime.device) for k, v in model_inputs(batch).items()}

    def logits(model):
        model.eval()
        with torch.no_grad(), torch.autocast(runtime.device, dtype=torch.bfloat16):
            return model(**inputs).logits.float()

    trained = logits(job.model)
    reloaded = logits(load_for_inference(cfg, adapter, runtime))
    del job
    base = logits(load_for_inference(cfg, None))
    assert (trained - base).abs().max() > 1e-2  # the adapter changes the output...
    torch.testing.assert_close(reloaded, trained, atol=2e-2, rtol=0)  # ...and reloads to the same output


def test_ftlabs_fusions_match_peft_and_transformers_on_4bit_layers(tmp_path, cache_dir, train_file):
    """The adapter term added inside the GEMM (train.fused_lora) and torch's fused RMSNorm (train.fused_rms_norm),
    the defaults, against PEFT's forward and transformers' norm, on bitsandbytes' 4-bit layers under bf16
    autocast: the same loss and gradients, up to bf16 rounding."""
    from trainer.data.tokenize import batches_for_epoch
    from trainer.loss import supervised_forward
    from trainer.fused import fused_lora_forward, fused_rms_norm_forward
    from trainer.train import FineTuningJob

    gradients, losses_seen = [], []
    for fused in ("true", "false"):
        cfg = compose_job(*qlora_args(train_file, cache_dir, "train.batch_size=4", f"train.fused_lora={fused}",
                                      f"train.fused_rms_norm={fused}"))
        job = FineTuningJob(cfg, tmp_path / f"run-{fused}")
        job.setup()
        n_fused = sum(getattr(m.forward, "__func__", None) is fused_lora_forward for m in job.model.modules())
        n_norms = sum(getattr(m.forward, "__func__", None) is fused_rms_norm_forward for m in job.model.modules())
        assert (n_fused, n_norms) == ((4 * 7, 4 * 2 + 1) if fused == "true" else (0, 0))
        torch.manual_seed(1)
        for name, parameter in job.model.named_parameters():
            if "lora_B" in name:  # B starts at zero: give the adapter's term a value
                torch.nn.init.normal_(parameter, std=0.05)
        batch = next(iter(batches_for_epoch(job.train_data, 4, 0, 0, job.tokenizer.pad_token_id)))
        inputs = {k: v.to(job.runtime.device) for k, v in batch.items()}
        with torch.autocast(job.runtime.device, dtype=job.runtime.dtype):
            loss_sum, _, _ = supervised_forward(job.train_model, inputs)
        loss_sum.backward()
        losses_seen.append(float(loss_sum.detach()))
        gradients.append({n: p.grad.float() for n, p in job.model.named_parameters() if p.requires_grad})
        del job
    assert losses_seen[0] == pytest.approx(losses_seen[1], rel=1e-2)
    assert gradients[0].keys() == gradients[1].keys() and len(gradients[0]) == 4 * 7 * 2
    for name, fused_grad in gradients[0].items():
        plain_grad = gradients[1][name]
        assert plain_grad.norm() > 0, f"{name} got no gradient"
        assert (fused_grad - plain_grad).norm() <= 0.05 * plain_grad.norm(), name


def run_ftlab(args: list[str], cwd: Path, launcher: list[str] = ()) -> subprocess.Popen:
    env = os.environ | {"HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    return subprocess.Popen([*(launcher or [sys.executable]), "-m", "trainer", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def losses(run_dir: Path) -> dict[int, float]:
    with open(run_dir / "results.csv") as handle:
        return {int(row["step"]): float(row["train_loss"]) for row in csv.DictReader(handle)}


def test_resume_after_kill_gives_the_same_losses(tmp_path, cache_dir, train_file):
    job = ["train", *qlora_args(train_file, cache_dir, "train.n_epochs=3", "train.batch_size=2",
                                "train.checkpoint_every=5")]
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    done = run_ftlab([*job, f"hydra.run.dir={reference}"], tmp_path)
    victim = run_ftlab([*job, f"hydra.run.dir={killed}"], tmp_path)
    kill_after_checkpoint(victim, killed, "step-0000[1-9]*", timeout=240)
    assert done.wait(timeout=300) == 0, done.stdout.read()
    assert json.loads((killed / "job.json").read_text())["status"] == "running", "the job ended before the kill"
    resumed = run_ftlab(["train", f"resume={killed}", f"cache_dir={cache_dir}"], tmp_path)
    output = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, output
    expected, got = losses(reference), losses(killed)
    assert sorted(got) == sorted(expected) == list(range(1, 61))
    for step in expected:
        assert got[step] == pytest.approx(expected[step], abs=2e-3), f"step {step}"


def torchrun(n_processes: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={n_processes}", "--master_port=29531"]


@pytest.mark.parametrize("n_processes", [1, 2])
def test_fsdp_qlora_trains(tmp_path, cache_dir, train_file, n_processes):
    if n_processes > (torch.cuda.device_count() if DEVICE == "cuda" else 0):
        pytest.skip(f"FSDP needs {n_processes} GPU(s)")
    run_dir = tmp_path / "fsdp"
    job = run_ftlab(["train", *qlora_args(train_file, cache_dir, "train.batch_size=4", "train.max_steps=6",
                                          preset="fsdp-qlora"), f"hydra.run.dir={run_dir}"],
                    tmp_path, launcher=torchrun(n_processes))
    output = job.communicate(timeout=300)[0]
    assert job.returncode == 0, output
    record = json.loads((run_dir / "job.json").read_text())
    assert record["status"] == "succeeded"
    assert f"Training on {n_processes} process(es) with fsdp" in (run_dir / "events.jsonl").read_text()
    steps = losses(run_dir)
    assert sorted(steps) == list(range(1, 7)) and all(0 < loss < 100 for loss in steps.values())
    assert (run_dir / "adapter" / "adapter_model.safetensors").stat().st_size > 0
