"""Checkpoints: `checkpoints/step-N/` holds what resuming needs — the adapter (PEFT format) and
`trainer_state.pt` (optimizer and scheduler states, RNG states, the loop's position and counters).

Two kinds, one format. An epoch checkpoint, written at the end of each epoch (and at a job's last
step), carries `epoch.json`: these are the job's published checkpoints, as the hosted service
makes them, and those of the last `EPOCHS_KEPT` epochs are kept. A resume checkpoint, written
every `train.checkpoint_every` steps and when a job is paused or cancelled, is only how a job
continues; the newest `train.keep_checkpoints` are kept. Resuming reads either kind, newest first,
and the caller skips any checkpoint that does not read back whole.

A checkpoint is staged in a hidden folder and renamed into place, so a killed run never leaves a
half-written one under its final name.
"""
import random
import shutil
import tempfile
from pathlib import Path

import torch

from trainer.files import write_json

STATE_FILE = "trainer_state.pt"
ADAPTER_FILE = "adapter/adapter_model.safetensors"
EPOCH_FILE = "epoch.json"  # marks an epoch checkpoint: {"epoch": N}
EPOCHS_KEPT = 3  # the hosted service keeps the checkpoints of the last three epochs


def checkpoint_path(folder: Path, step: int) -> Path:
    return Path(folder) / f"step-{step:06d}"


def stage_adapter(folder: Path, model) -> Path:
    """A hidden staging folder in `folder` holding the model's adapter (call with the full parameters at hand)."""
    folder.mkdir(exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder, prefix=".staging-"))
    model.save_pretrained(staging / "adapter")
    return staging


def commit(staging: Path, target: Path, loop_state: dict, optimizer, scheduler, keep: int,
           epoch: int | None = None) -> Path:
    """Add the trainer state (and with `epoch`, the epoch mark) to `staging`, rename it to `target`, and prune."""
    torch.save({**loop_state, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                "python_rng": random.getstate()}, staging / STATE_FILE)
    if epoch is not None:
        write_json(staging / EPOCH_FILE, {"epoch": epoch})
    staging.rename(target)
    prune(target.parent, keep)
    return target


def mark_epoch(checkpoint: Path, epoch: int, keep: int) -> Path:
    """Make an existing checkpoint (written by the same step) the checkpoint of `epoch`, and prune."""
    write_json(checkpoint / EPOCH_FILE, {"epoch": epoch})
    prune(checkpoint.parent, keep)
    return checkpoint


def is_epoch_checkpoint(checkpoint: Path) -> bool:
    return (checkpoint / EPOCH_FILE).is_file()


def prune(folder: Path, keep: int) -> None:
    """Keep the epoch checkpoints of the last `EPOCHS_KEPT` epochs and the newest `keep` resume checkpoints."""
    kept = newest_first(folder)
    epochs = [path for path in kept if is_epoch_checkpoint(path)]
    resume = [path for path in kept if not is_epoch_checkpoint(path)]
    for old in epochs[EPOCHS_KEPT:] + resume[keep:]:
        shutil.rmtree(old, ignore_errors=True)


def newest_first(folder: Path) -> list[Path]:
    """The checkpoints in `folder` (both kinds), newest first."""
    return sorted(Path(folder).glob("step-*"), reverse=True)


def published(folder: Path) -> list[Path]:
    """The epoch checkpoints in `folder`, newest first: what a job lists and names `…:ckpt-step-N`."""
    return [path for path in newest_first(folder) if is_epoch_checkpoint(path)]


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
