"""Model FLOPs utilisation (MFU): the FLOP model that the training loop and the bench share, and
the device's peak to divide by (a table for GPUs, a measured matmul rate for CPUs, cached).

LoRA on a frozen base costs about 4 × N FLOPs per token: 2N forward, 2N backward through the
activations (no weight gradients for the frozen N; the adapter's are negligible). Attention's
own FLOPs and gradient checkpointing's recompute are not counted, as is the convention.
"""
import json
import os
import platform
import time
from pathlib import Path

# dense bf16/fp16 tensor-core peak of one GPU, by a substring of torch.cuda.get_device_name()
GPU_PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "GH200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12,
                  "L4": 121e12, "4090": 165e12, "3090": 71e12, "V100": 125e12, "T4": 65e12}


def flops_per_token(n_params: float) -> float:
    """Training FLOPs per token of LoRA on a frozen base of `n_params` parameters."""
    return 4.0 * n_params


def gpu_peak_flops(device_name: str) -> float | None:
    """The card's dense half-precision peak from the table, or None for a card it does not know."""
    return next((peak for key, peak in GPU_PEAK_FLOPS.items() if key in device_name), None)


def measure_cpu_peak_flops(dtype, size: int = 1024, seconds: float = 0.3) -> float:
    """FLOP/s of square `dtype` matmuls on this CPU with torch's threads: the CPU's practical peak."""
    import torch

    a, b = torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)
    torch.mm(a, b)  # warm up (oneDNN builds its kernel)
    runs, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds:
        torch.mm(a, b)
        runs += 1
    return 2 * size**3 * runs / elapsed


def cpu_peak_flops(dtype, cache_dir: Path) -> float:
    """`measure_cpu_peak_flops`, measured once per CPU model, thread count and dtype (cache_dir/cpu_peak_flops.json)."""
    import torch

    from trainer.files import write_json

    cpu = platform.processor() or platform.machine()
    if Path("/proc/cpuinfo").exists():
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), cpu)
    key = f"{cpu} | {torch.get_num_threads()} threads | {str(dtype).removeprefix('torch.')}"
    path = Path(cache_dir) / "cpu_peak_flops.json"
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    if key not in known:
        known[key] = measure_cpu_peak_flops(dtype)
        os.makedirs(path.parent, exist_ok=True)
        write_json(path, known)
    return known[key]


def peak_flops(device: str, dtype, cache_dir: Path) -> float | None:
    """The peak that MFU divides by on this device (None for a GPU missing from the table)."""
    if device == "cuda":
        import torch

        return gpu_peak_flops(torch.cuda.get_device_name())
    return cpu_peak_flops(dtype, cache_dir)
