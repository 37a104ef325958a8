"""QLoRA on CPU: NF4 loading works, and the bitsandbytes AVX512-BF16 repacking trap is disarmed.

Without `disable_cpu_weight_repacking`, a no-grad forward (an eval pass) repacks Linear4bit
weights and every later backward silently gives zero or wrong LoRA gradients.
"""
import torch

from trainer.model import Runtime, add_lora, load_base_model


def lora_gradients(model, batch) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    model(**batch, labels=batch["input_ids"]).loss.backward()
    return {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.requires_grad}




def test_lora_gradients_survive_an_eval_pass_on_nf4(make_cfg):
    cfg = make_cfg("train.quantization=nf4", "lora.dropout=0.0")
    runtime = Runtime(device="cpu", dtype=torch.float32, quantization="nf4")
    torch.manual_seed(0)
    model = add_lora(load_base_model(cfg, runtime), cfg, runtime)
    import bitsandbytes as bnb

    four_bit = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert four_bit, "backbone was not quantized to 4-bit"
    assert all(not m.support_avx512bf16_for_cpu for m in four_bit)
    # Make lora_B non-zero so lora_A gets gradients too.
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.02)
    batch = {"input_ids": torch.randint(3, 300, (2, 12)), "attention_mask": torch.ones(2, 12, dtype=torch.long)}
    model.train()
    first = lora_gradients(model, batch)
    model.eval()
    with torch.no_grad():
        model(**batch)
        model.generate(input_ids=batch["input_ids"][:1], max_new_tokens=2, do_sample=False)
    model.train()
    second = lora_gradients(model, batch)
    assert first.keys() == second.keys() and len(first) > 0
    for name in first:
        assert first[name].abs().sum() > 0, f"{name} got no gradient"
        torch.testing.assert_close(second[name], first[name], rtol=1e-4, atol=1e-6, msg=f"{name} changed after eval")
