"""Checkpoints: `checkpoints/step-N/` holds what resuming needs — the adapter (PEFT format) and
`trainer_state.pt` (optimizer and scheduler states, RNG states, the loop's position and counters).

A checkpoint is staged in a hidden folder and renamed into place, so a killed run never leaves a
half-written one under its final name; the newest `keep` are kept. Reading goes newest first and
the caller skips any checkpoint that does not read back whole.
"""
import random
import shutil
import tempfile
from pathlib import Path

import torch

STATE_FILE = "trainer_state.pt"
ADAPTER_FILE = "adapter/adapter_model.safetensors"


def checkpoint_path(folder: Path, step: int) -> Path:
    return Path(folder) / f"step-{step:06d}"


def stage_adapter(folder: Path, model) -> Path:
    """A hidden staging folder in `folder` holding the model's adapter (call with the full parameters at hand)."""
    folder.mkdir(exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder, prefix=".staging-"))
    model.save_pretrained(staging / "adapter")
    return staging


def commit(staging: Path, target: Path, loop_state: dict, optimizer, scheduler, keep: int) -> Path:
    """Add the trainer state to `staging`, rename it to `target`, and drop all but the newest `keep`."""
    torch.save({**loop_state, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                "python_rng": random.getstate()}, staging / STATE_FILE)
    staging.rename(target)
    for old in sorted(target.parent.glob("step-*"))[: -keep or None]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def newest_first(folder: Path) -> list[Path]:
    """The checkpoints in `folder`, newest first."""
    return sorted(Path(folder).glob("step-*"), reverse=True)


def read(checkpoint: Path) -> tuple[dict, dict]:
    """The adapter's tensors and the trainer state of one checkpoint (raises if either does not read back)."""
    from safetensors.torch import load_file

    return load_file(checkpoint / ADAPTER_FILE), torch.load(checkpoint / STATE_FILE, weights_only=False)


def restore_rng(state: dict) -> None:
    """Put torch's, CUDA's and Python's random generators back where the checkpoint found them."""
    torch.set_rng_state(state["torch_rng"])
    if state.get("cuda_rng") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    random.setstate(state["python_rng"])
