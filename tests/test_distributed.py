"""Two processes on the gloo backend (torchrun, CPU) give the losses of one process with the same global batch."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import chat_example, write_jsonl

BIN = Path(sys.executable).parent


def losses(run_dir: Path) -> list[tuple[float, float]]:
    with open(run_dir / "results.csv") as handle:
        return [(float(r["train_loss"]), float(r["valid_loss"] or "nan")) for r in csv.DictReader(handle)]


@pytest.mark.parametrize("packing", ["false", "true"])
def test_two_gloo_processes_match_one(tmp_path, cache_dir, packing):
    train = write_jsonl(tmp_path / "train.jsonl", [chat_example(f"Question {i}?" + " more" * (i % 5), f"Answer {i}")
                                                   for i in range(14)])
    valid = write_jsonl(tmp_path / "valid.jsonl", [chat_example(f"Check {i}?", f"Yes {i}") for i in range(5)])
    args = ["train", "backbone=tiny-llama", "logger=none", "train.device=cpu", "train.precision=fp32", "moderation=off", "data=custom",
            f"data.train_file={train}", f"data.validation_file={valid}", "train.n_epochs=2", "train.batch_size=4",
            "lora.dropout=0.0", "train.eval_every=2", "train.checkpoint_every=3", f"train.packing={packing}",
            f"cache_dir={cache_dir}"]
    env = os.environ | {"HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    single = subprocess.run([str(BIN / "ftlab"), *args, f"hydra.run.dir={tmp_path / 'one'}"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stdout + single.stderr
    double = subprocess.run([str(BIN / "torchrun"), "--nproc_per_node=2", "--master_port=29517", str(BIN / "ftlab"),
                             *args, f"hydra.run.dir={tmp_path / 'two'}"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert double.returncode == 0, double.stdout + double.stderr
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(one) == len(two) == 8
    for (train_one, valid_one), (train_two, valid_two) in zip(one, two):
        assert train_two == pytest.approx(train_one, abs=1e-4)
        assert valid_two == pytest.approx(valid_one, abs=1e-4, nan_ok=True)
    job = json.loads((tmp_path / "two" / "job.json").read_text())
    assert job["status"] == "succeeded" and job["trained_tokens"] == json.loads(
        (tmp_path / "one" / "job.json").read_text())["trained_tokens"]
    assert (tmp_path / "two" / "adapter" / "adapter_model.safetensors").exists()


def test_gradients_are_clipped_by_the_wrappers_whole_norm_under_fsdp():
    import torch

    from trainer.distributed import clip_gradients

    layer = torch.nn.Linear(3, 1)
    layer.weight.grad = torch.full_like(layer.weight, 4.0)
    layer.bias.grad = torch.zeros_like(layer.bias)
    norm = clip_gradients(layer, list(layer.parameters()), 1.0)  # a plain or DDP model: its own gradients
    assert float(norm) == pytest.approx(48 ** 0.5) and float(layer.weight.grad.norm()) == pytest.approx(1.0, rel=1e-4)

    class FullyShardedDataParallel(torch.nn.Module):  # stands in for the wrapper: its clip sees every shard
        def clip_grad_norm_(self, max_norm):
            return torch.tensor(float("inf"))

    assert clip_gradients(FullyShardedDataParallel(), [], 1.0) == float("inf")  # every rank skips alike
