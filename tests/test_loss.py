"""The fused, chunked LM-head loss gives the plain loss, accuracy and gradients without whole logits."""
import torch

import trainer.loss
from trainer.data.tokenize import collate, tokenize_examples
from trainer.loss import fusable_head, supervised_forward, token_loss_and_accuracy


def test_chunked_head_matches_plain_cross_entropy_in_loss_accuracy_and_gradient(monkeypatch):
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False).requires_grad_(False)
    hidden = torch.randn(3, 7, 16, requires_grad=True)
    targets = torch.randint(0, 50, (3, 7))
    targets[0, :3] = -100  # prompt positions
    plain_hidden = hidden.detach().clone().requires_grad_(True)
    plain = token_loss_and_accuracy(head(plain_hidden), targets)
    monkeypatch.setattr(trainer.loss, "LOGITS_PER_CHUNK", 50 * 4)  # 4 rows a chunk: several chunks, one ragged
    fused = token_loss_and_accuracy(hidden, targets, head=head)
    assert fused[1:] == plain[1:] == (18, plain[2])
    torch.testing.assert_close(fused[0], plain[0])
    fused[0].mul(0.5).backward()
    plain[0].mul(0.5).backward()
    torch.testing.assert_close(hidden.grad, plain_hidden.grad)
    assert hidden.grad[0, :3].abs().sum() == 0  # no gradient where nothing is supervised


def three_example_batch(tokenizer) -> dict:
    rows = [{"messages": [{"role": "user", "content": "fox " * (i + 2)}, {"role": "assistant", "content": "dog " * (i + 1)}]}
            for i in range(3)]
    return collate(tokenize_examples(list(enumerate(rows)), tokenizer, chat=True, max_length=64).examples,
                   tokenizer.pad_token_id)


def test_a_job_forward_is_fused_and_equal_to_the_plain_one(make_cfg, monkeypatch):
    from trainer.model import Runtime, add_lora, load_base_model, load_tokenizer

    cfg = make_cfg("lora.dropout=0")
    batch = three_example_batch(load_tokenizer(cfg))
    model = add_lora(load_base_model(cfg, Runtime("cpu", torch.float32, "none")), cfg, Runtime("cpu", torch.float32, "none"))
    assert fusable_head(model) is model.get_output_embeddings()
    results = {}
    for fused in (True, False):
        if not fused:
            monkeypatch.setattr(trainer.loss, "fusable_head", lambda model: None)
        model.zero_grad()
        loss, n, correct = supervised_forward(model, batch)
        loss.backward()
        grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
        results[fused] = (loss.detach(), n, correct, grads)
    assert type(model.get_output_embeddings()) is torch.nn.Linear  # the head is back after the fused forward
    assert results[True][1:3] == results[False][1:3]
    torch.testing.assert_close(results[True][0], results[False][0])
    for fused_grad, plain_grad in zip(results[True][3], results[False][3]):
        torch.testing.assert_close(fused_grad, plain_grad, atol=1e-6, rtol=1e-4)
    assert any(g.abs().sum() > 0 for g in results[True][3])


def test_a_trainable_head_is_not_fused():
    head = torch.nn.Linear(4, 8)

    class Model(torch.nn.Module):
        config = None

        def get_output_embeddings(self):
            return head

    assert fusable_head(Model()) is None  # requires_grad: the loss must not own its gradient
    head.requires_grad_(False)
    assert fusable_head(Model()) is head


def test_bf16_adapters_take_their_input_as_is_and_learn_what_the_fp32_cast_would(make_cfg):
    """Under autocast PEFT's fp32 copy of each adapter's input is dropped: same loss and gradients, fp32 weights."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    from trainer.model import Runtime, add_lora, load_base_model, load_tokenizer

    cfg = make_cfg("lora.dropout=0")
    batch = three_example_batch(load_tokenizer(cfg))
    bf16 = Runtime("cpu", torch.bfloat16, "none")
    torch.manual_seed(0)
    model = add_lora(load_base_model(cfg, bf16), cfg, bf16)
    adapters = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    assert adapters and not any(m.cast_input_dtype_enabled for m in adapters)
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)  # the optimizer's weights
    for p in model.parameters():  # B starts at zero; give the adapters something to say
        if p.requires_grad:
            p.data.normal_(0, 0.02)
    results = {}
    for cast in (False, True):
        for m in adapters:
            m.cast_input_dtype_enabled = cast
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, _, _ = supervised_forward(model, batch)
        loss.backward()
        results[cast] = (loss.detach().float(), [p.grad.clone() for p in model.parameters() if p.requires_grad])
    torch.testing.assert_close(results[False][0], results[True][0], atol=1e-2, rtol=1e-3)
    for without, with_cast in zip(results[False][1], results[True][1]):
        torch.testing.assert_close(without, with_cast, atol=1e-3, rtol=5e-2)
    fp32 = Runtime("cpu", torch.float32, "none")
    assert all(m.cast_input_dtype_enabled for m in add_lora(load_base_model(cfg, fp32), cfg, fp32).modules()
               if isinstance(m, BaseTunerLayer))  # no autocast in fp32: PEFT's own behaviour
