"""ftlab's fusions: the LoRA forward gives PEFT's outputs and gradients and leaves PEFT's other modes alone;
the RMSNorm gives transformers' outputs and gradients."""
import pytest
import torch

from trainer.fused import fuse_rms_norms, fused_lora_forward, fused_rms_norm_forward
from trainer.model import Runtime, add_lora, load_base_model


def lora_model(make_cfg, *overrides: str, dtype=torch.float32, quantization: str = "none", like=None):
    """The tiny Llama with a LoRA adapter whose B is not zero; with `like`, that model's adapter."""
    cfg = make_cfg(*overrides)
    runtime = Runtime(device="cpu", dtype=dtype, quantization=quantization)
    torch.manual_seed(0)
    model = add_lora(load_base_model(cfg, runtime), cfg, runtime)
    torch.manual_seed(1)
    for name, parameter in model.named_parameters():
        if "lora_B" in name:  # PEFT starts B at zero; make the adapter's term count
            torch.nn.init.normal_(parameter, std=0.05)
    if like is not None:
        adapter = {name: value for name, value in like.state_dict().items() if "lora_" in name}
        assert not model.load_state_dict(adapter, strict=False).unexpected_keys
    return model


def fused_layers(model) -> list:
    return [m for m in model.modules() if getattr(m.forward, "__func__", None) is fused_lora_forward]


def loss_and_gradients(model, dtype) -> tuple[torch.Tensor, dict]:
    batch = {"input_ids": torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(2))}
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        loss = model(**batch, labels=batch["input_ids"]).loss
    loss.backward()
    return loss.detach(), {n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("quantization", ["none", "nf4"])
def test_fused_forward_matches_pefts_loss_and_gradients(make_cfg, quantization):
    fused = lora_model(make_cfg, f"train.quantization={quantization}", quantization=quantization)
    plain = lora_model(make_cfg, f"train.quantization={quantization}", "train.fused_lora=false",
                       quantization=quantization, like=fused)
    assert len(fused_layers(fused)) == 7 * fused.config.num_hidden_layers and not fused_layers(plain)
    fused_loss, fused_grads = loss_and_gradients(fused, torch.float32)
    plain_loss, plain_grads = loss_and_gradients(plain, torch.float32)
    torch.testing.assert_close(fused_loss, plain_loss, rtol=1e-5, atol=1e-5)
    assert fused_grads.keys() == plain_grads.keys()
    for name, grad in plain_grads.items():
        assert grad.abs().sum() > 0, f"{name} got no gradient"
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_fused_forward_in_bf16_is_as_close_to_fp32_as_pefts(make_cfg):
    """Under bf16 autocast the two round differently (the fused GEMM sums the adapter term in fp32):
    each gradient must be about as close to the fp32 one as PEFT's."""
    reference = lora_model(make_cfg)
    fused = lora_model(make_cfg, dtype=torch.bfloat16, like=reference)
    plain = lora_model(make_cfg, "train.fused_lora=false", dtype=torch.bfloat16, like=reference)
    exact_loss, exact = loss_and_gradients(reference, torch.float32)
    fused_loss, fused_grads = loss_and_gradients(fused, torch.bfloat16)
    plain_loss, plain_grads = loss_and_gradients(plain, torch.bfloat16)
    assert abs(fused_loss - exact_loss) <= max(2 * abs(plain_loss - exact_loss), 2e-3)
    for name, grad in exact.items():
        fused_error = float((fused_grads[name] - grad).norm() / grad.norm())
        plain_error = float((plain_grads[name] - grad).norm() / grad.norm())
        assert fused_error <= max(2 * plain_error, 0.03), (name, fused_error, plain_error)


def test_fused_forward_under_gradient_checkpointing_matches(make_cfg):
    fused = lora_model(make_cfg, "train.gradient_checkpointing=true")
    plain = lora_model(make_cfg, "train.gradient_checkpointing=true", "train.fused_lora=false", like=fused)
    fused.train(), plain.train()
    _, fused_grads = loss_and_gradients(fused, torch.float32)
    _, plain_grads = loss_and_gradients(plain, torch.float32)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_disabled_adapter_and_generation_take_pefts_paths(make_cfg):
    model = lora_model(make_cfg)
    base = load_base_model(make_cfg(), Runtime(device="cpu", dtype=torch.float32, quantization="none"))
    ids = torch.randint(3, 300, (1, 9), generator=torch.Generator().manual_seed(3))
    model.eval()
    with torch.no_grad():
        with model.disable_adapter():
            torch.testing.assert_close(model(input_ids=ids).logits, base(input_ids=ids).logits)
        assert not torch.allclose(model(input_ids=ids).logits, base(input_ids=ids).logits)
        model.config.use_cache = True
        generated = model.generate(input_ids=ids, max_new_tokens=3, do_sample=False)
    assert generated.shape == (1, 12)


def test_layers_with_dropout_or_dora_keep_pefts_forward(make_cfg):
    from peft import LoraConfig, get_peft_model

    from trainer.fused import fuse_lora_adds

    model = lora_model(make_cfg, "lora.dropout=0.1")
    assert not fused_layers(model)
    dora = get_peft_model(torch.nn.Sequential(torch.nn.Linear(8, 8)), LoraConfig(r=2, target_modules=["0"], use_dora=True))
    assert fuse_lora_adds(dora) == 0


def llama_norm(hidden_size: int = 64, dtype=torch.float32):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    norm = LlamaRMSNorm(hidden_size, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    return norm


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_fused_rms_norm_matches_transformers_norm(dtype, tolerance):
    norm = llama_norm(dtype=dtype)
    fused = llama_norm(dtype=dtype)
    fused.load_state_dict(norm.state_dict())
    assert fuse_rms_norms(fused) == 1
    x = (torch.randn(3, 7, 64) * 4).to(dtype).requires_grad_()
    expected, got = norm(x), fused(x)
    assert got.dtype == expected.dtype == dtype
    torch.testing.assert_close(got, expected, rtol=tolerance, atol=tolerance)
    (expected_grad,) = torch.autograd.grad(expected.float().square().sum(), x)
    (got_grad,) = torch.autograd.grad(got.float().square().sum(), x)
    torch.testing.assert_close(got_grad.float(), expected_grad.float(), rtol=5 * tolerance, atol=5 * tolerance)


def test_fused_rms_norm_stays_in_bf16_under_autocast_and_falls_back_for_an_fp32_stream():
    norm = llama_norm(dtype=torch.bfloat16)
    reference = llama_norm(dtype=torch.bfloat16)
    reference.load_state_dict(norm.state_dict())
    fuse_rms_norms(norm)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert norm(torch.randn(2, 64, dtype=torch.bfloat16)).dtype == torch.bfloat16
    fp32_stream = torch.randn(2, 64)  # train.fp32_hidden_states: transformers' mixed formula, exactly
    torch.testing.assert_close(norm(fp32_stream), reference(fp32_stream), rtol=0, atol=0)


def test_a_job_fuses_every_norm_of_the_backbone_unless_told_not_to(make_cfg, chat_files, tmp_path):
    from trainer.train import FineTuningJob

    train, valid = chat_files
    counts = {}
    for fused in ("true", "false"):
        cfg = make_cfg("data=custom", f"data.train_file={train}", f"data.validation_file={valid}",
                       f"train.fused_rms_norm={fused}", "train.max_steps=1")
        job = FineTuningJob(cfg, tmp_path / fused)
        job.setup()
        counts[fused] = sum(getattr(m.forward, "__func__", None) is fused_rms_norm_forward for m in job.model.modules())
    layers = job.model.config.num_hidden_layers
    assert counts == {"true": 2 * layers + 1, "false": 0}  # two per layer and the final norm


def test_fsdp_jobs_keep_pefts_lora_forward(make_cfg):
    """FSDP wraps each LoRA matrix as its own unit, gathered only when its own forward runs."""
    assert fused_layers(lora_model(make_cfg, "train.distributed=ddp"))
    assert not fused_layers(lora_model(make_cfg, "train.distributed=fsdp"))
