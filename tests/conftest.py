"""Shared fixtures: composed configs on the tiny Llama, data files in tmp_path, no network."""
import json
import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "offline"
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import pytest  # noqa: E402

from trainer.compose import compose  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> str:
    """One ftlab cache for the whole session (the tiny backbone is built once)."""
    return str(tmp_path_factory.mktemp("ftlab-cache"))


@pytest.fixture
def make_cfg(cache_dir):
    """Compose conf/config.yaml with overrides, on the tiny Llama, CPU, no logger, a couple of steps."""

    def make(*overrides: str):
        return compose(["backbone=tiny-llama", "logger=none", "train.device=cpu", "train.precision=fp32",
                        f"cache_dir={cache_dir}", *overrides])

    return make


def write_jsonl(path: Path, rows: list) -> Path:
    """Write rows (dicts, or raw strings for deliberately broken lines) as JSONL."""
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def chat_example(question: str, answer: str, system: str | None = "Reply briefly.") -> dict:
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return {"messages": messages}


@pytest.fixture
def chat_files(tmp_path):
    """A 12-example training file and a 4-example validation file in OpenAI's chat format."""
    train = write_jsonl(tmp_path / "train.jsonl", [chat_example(f"What is {i} + {i}?", str(2 * i)) for i in range(12)])
    valid = write_jsonl(tmp_path / "valid.jsonl", [chat_example(f"What is {i} + 1?", str(i + 1)) for i in range(4)])
    return train, valid


def saved_adapter(cfg, folder: Path, std: float = 1.0):
    """A LoRA adapter on the tiny Llama whose B weights are random (a fresh one's are zero and change nothing),
    saved in `folder`; returns the PEFT model."""
    import torch

    from trainer.model import add_lora, load_base_model, resolve_runtime

    runtime = resolve_runtime(cfg.train)
    model = add_lora(load_base_model(cfg, runtime), cfg, runtime)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, std)
    model.save_pretrained(folder)
    return model


def kill_after_checkpoint(victim, run_dir: Path, pattern: str, timeout: float) -> None:
    """SIGKILL a training process as soon as `run_dir/checkpoints/<pattern>` exists (or after `timeout` s)."""
    import signal
    import time

    deadline = time.time() + timeout
    while not list((run_dir / "checkpoints").glob(pattern)) and time.time() < deadline:
        time.sleep(0.005)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
