"""Data-parallel training with torch.distributed: the same entrypoint under `torchrun` or
`accelerate launch` (both set RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR).

Every rank walks the same global batches (same seed) and trains on its share of each batch's
examples; the loss is normalised by the global number of supervised tokens, so gradients equal
those of one process with the whole batch. Rank 0 keeps the job record.
"""
import functools
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class ProcessGroup:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def launched_world_size() -> int:
    """How many processes the launcher started (1 when run directly)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_process_group(device: str) -> ProcessGroup:
    """Join the launcher's process group (gloo on CPU, nccl on CUDA); a single process when not launched."""
    world_size = launched_world_size()
    if world_size == 1:
        return ProcessGroup()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        if device == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend="nccl" if device == "cuda" else "gloo")
    return ProcessGroup(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank)


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
        from torch.distributed.fsdp import FullyShardedDataParallel
        from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

        layer_classes = {type(m) for m in model.modules() if type(m).__name__.endswith("DecoderLayer")}
        policy = functools.partial(transformer_auto_wrap_policy, transformer_layer_cls=layer_classes)
        return FullyShardedDataParallel(model, auto_wrap_policy=policy, use_orig_params=True,
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
