"""Data-parallel training with torch.distributed: the same entrypoint under `torchrun` or
`accelerate launch` (both set RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR), or as the tasks of a
Slurm job step (`srun`, several tasks: SLURM_PROCID / SLURM_STEP_NUM_TASKS / SLURM_LOCALID, the
step's first node as the master, a port from the job id unless MASTER_PORT is set).

A launcher's single process (`torchrun --nproc_per_node 1`) joins a group of one, so DDP and
FSDP wrap the model as they would on several GPUs: the same code path, checkable on one GPU.

Every rank walks the same global batches (same seed) and trains on its share of each batch's
examples; the loss is normalised by the global number of supervised tokens, so gradients equal
those of one process with the whole batch. Rank 0 keeps the job record.
"""
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class ProcessGroup:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    launched: bool = False  # started by torchrun / accelerate (a process group exists, even of one)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.launched


def launched() -> bool:
    """Whether a launcher started this process as one of several: torchrun and accelerate launch set RANK and
    WORLD_SIZE; srun sets SLURM_STEP_NUM_TASKS in each task of a step (one task alone is a plain process)."""
    return ("RANK" in os.environ and "WORLD_SIZE" in os.environ
            or int(os.environ.get("SLURM_STEP_NUM_TASKS", "1")) > 1 and "SLURM_PROCID" in os.environ)


def slurm_rendezvous() -> dict:
    """torch.distributed's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) from a Slurm step's."""
    import subprocess

    nodes = os.environ.get("SLURM_STEP_NODELIST") or os.environ["SLURM_JOB_NODELIST"]
    first = subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True, text=True,
                           check=True).stdout.split()[0]
    return {"RANK": os.environ["SLURM_PROCID"], "WORLD_SIZE": os.environ["SLURM_STEP_NUM_TASKS"],
            "LOCAL_RANK": os.environ.get("SLURM_LOCALID", "0"), "MASTER_ADDR": first,
            "MASTER_PORT": str(20000 + int(os.environ.get("SLURM_JOB_ID", "0")) % 20000)}


def init_process_group(device: str) -> ProcessGroup:
    """Join the launcher's process group (gloo on CPU, nccl on CUDA); a plain process when not launched."""
    if not launched():
        return ProcessGroup()
    if "RANK" not in os.environ:  # srun's tasks: what torchrun would have set, from Slurm's variables
        for key, value in slurm_rendezvous().items():
            os.environ.setdefault(key, value)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        if device == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend="nccl" if device == "cuda" else "gloo")
    return ProcessGroup(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank, launched=True)


def sum_across(group: ProcessGroup, values: list[float], device: str) -> list[float]:
    """Element-wise sum of `values` over all ranks (the values themselves on one process)."""
    if not group.enabled:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def wrap(model: torch.nn.Module, group: ProcessGroup, device: str, strategy: str) -> torch.nn.Module:
    """The module the training forward runs through: DDP or FSDP when launched on several ranks."""
    if not group.enabled:
        return model
    device_ids = [group.local_rank] if device == "cuda" else None
    if strategy == "fsdp":  # shards the frozen (e.g. NF4) backbone too: for backbones one GPU cannot hold
        from peft.utils.other import fsdp_auto_wrap_policy
        from torch.distributed.fsdp import FullyShardedDataParallel

        # a unit per decoder layer (frozen, one dtype) and one per LoRA matrix (trainable, fp32): FSDP
        # flattens each unit into one tensor, so no unit may mix dtypes
        return FullyShardedDataParallel(model, auto_wrap_policy=fsdp_auto_wrap_policy(model), use_orig_params=True,
                                        device_id=group.local_rank if device == "cuda" else None)
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def destroy(group: ProcessGroup) -> None:
    if group.enabled and dist.is_initialized():
        dist.destroy_process_group()


def full_parameters(module: torch.nn.Module):
    """A context in which an FSDP-sharded module holds its full parameters (to save the adapter); else nothing."""
    import contextlib

    if type(module).__name__ == "FullyShardedDataParallel":
        from torch.distributed.fsdp import FullyShardedDataParallel

        return FullyShardedDataParallel.summon_full_params(module, writeback=False)
    return contextlib.nullcontext()


def clip_gradients(model: torch.nn.Module, parameters: list, max_norm: float) -> torch.Tensor:
    """Clip to `max_norm` by the norm of the whole gradient, returned; the same number on every rank.

    Under FSDP each rank holds only its shard of each gradient, so the wrapper's own clipping
    (which all-reduces the shards' norms) is the only one that sees the whole; every rank then
    takes, or skips as non-finite, the same step. Under DDP the gradients are already whole.
    """
    if type(model).__name__ == "FullyShardedDataParallel":
        return model.clip_grad_norm_(max_norm)
    return torch.nn.utils.clip_grad_norm_(parameters, max_norm)
