"""Projections with their weights prepacked for oneDNN, for decoding fp32 on a CPU.

A decoding step multiplies a few rows (one a request) by every weight of the model. MKL's fp32 GEMM,
behind `F.linear`, runs such products far below its one-row speed: on this machine's 2 cores a
1536×576 projection takes 48 µs for one row and 239 µs for 16; the 49152×576 LM head 6.9 ms for one
row and 13.9 ms for 16. oneDNN's inner-product with the weight reordered once into its blocked layout
(`torch.ops.mkldnn._reorder_linear_weight`, what torch.compile's CPU freezing uses) takes 34 µs and
76 µs, and 2.6 ms and 3.3 ms (`scripts/bench_engine.py`).

So an engine whose model is frozen, fp32 and on a CPU gives each `nn.Linear` (LoRA's own A and B
excepted: an adapter's term is added on its rows, `trainer.engine.lora`) a packed copy of its weight,
used by its forward under `torch.inference_mode()`: every forward of the engine. Anything else (a
no-grad validation pass, a weight that changed since it was packed) takes `F.linear` as before. The
copy costs the projections' weights once more in memory.
"""
import types

import torch
import torch.nn.functional as F

PACKING_HINT = 16  # the batch size oneDNN tunes the layout for; measured the same from 1 to 64 rows


def packable(model) -> bool:
    """Whether an engine should pack `model`'s projections: fp32 on a CPU, with oneDNN, and nothing being trained
    (reinforcement fine-tuning samples from the model it trains: no second copy of its weights there)."""
    parameters = list(model.parameters())
    return (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and all(p.device.type == "cpu" and p.dtype == torch.float32 and not p.requires_grad for p in parameters))


def pack_projections(model) -> int:
    """Give every `nn.Linear` of `model` but LoRA's A and B the packed forward; returns how many (idempotent)."""
    count = 0
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or ".lora_A." in f".{name}." or ".lora_B." in f".{name}.":
            continue
        if "ftlab_packed" not in module.__dict__:
            weight = module.weight.detach()
            module.ftlab_packed = (module.weight._version, torch.ops.mkldnn._reorder_linear_weight(weight, PACKING_HINT))
            module.forward = types.MethodType(packed_linear_forward, module)
        count += 1
    return count


def packed_linear_forward(self, x: torch.Tensor) -> torch.Tensor:
    """oneDNN's product with the packed weight under inference mode while the weight is unchanged, else F.linear."""
    version, packed = self.ftlab_packed
    if torch.is_inference_mode_enabled() and x.dtype == torch.float32 and self.weight._version == version:
        return torch.ops.mkldnn._linear_pointwise(x, packed, self.bias, "none", [], "")
    return F.linear(x, self.weight, self.bias)
