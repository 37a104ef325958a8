"""trainer.cost: cookbook token counting, the auto-epochs rule, published prices, local estimate."""
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from trainer import cost
from trainer.cost import estimate_from_token_counts, estimate_job
from trainer.data.tokens import count_example_tokens, get_encoding
from trainer.hyperparams import resolve_n_epochs
from trainer.schema import DataFormat, FtlabConfig

CONF = Path(__file__).resolve().parent.parent / "conf"
ENC = get_encoding("cl100k_base")


def make_cfg(model="gpt-3.5-turbo", fmt="chat", n_epochs="auto", **pricing):
    cfg = OmegaConf.structured(FtlabConfig)
    cfg.model = OmegaConf.merge(cfg.model, {"name": model, "format": fmt})
    cfg.pricing = OmegaConf.merge(cfg.pricing, OmegaConf.load(CONF / "pricing" / "openai-2023-08.yaml"), pricing)
    cfg.train.n_epochs = n_epochs
    cfg.train.device = "cpu"
    cfg.backbone.n_params = 1.35e8
    return cfg


def test_encoding_is_cl100k_and_offline():
    assert ENC.encode_ordinary("hello world") == [15339, 1917]
    assert ENC.n_vocab == 100277
    assert get_encoding("cl100k_base") is ENC  # cached


def test_unknown_encoding_names_the_config_key():
    with pytest.raises(ValueError, match="model.encoding='no_such_encoding'"):
        get_encoding("no_such_encoding")


def test_chat_tokens_counted_by_hand():
    example = {"messages": [
        {"role": "system", "content": "You are helpful."},  # system=[9125], 4 tokens [2675, 527, 11190, 13]
        {"role": "user", "content": "Hi"},  # user=[882], Hi=[13347]
        {"role": "assistant", "content": "Hello!", "name": "bot"},  # assistant=[78191], [9906, 0], bot=[6465] +1
    ]}
    by_hand = (3 + 1 + 4) + (3 + 1 + 1) + (3 + 1 + 2 + 1 + 1) + 3
    assert by_hand == 24
    assert count_example_tokens(example, DataFormat.chat, ENC) == by_hand


def test_weight_and_special_token_text():
    # weight (a number) adds nothing; "<|endoftext|>" in data is plain text (7 tokens), never an error
    example = {"messages": [{"role": "user", "content": "<|endoftext|>"},
                            {"role": "assistant", "content": "Hi", "weight": 1}]}
    assert count_example_tokens(example, DataFormat.chat, ENC) == (3 + 1 + 7) + (3 + 1 + 1) + 3


def test_prompt_completion_tokens_counted_by_hand():
    example = {"prompt": "Q: 2+2?\n\n###\n\n", "completion": " 4 END"}  # 8 + 3 tokens
    assert count_example_tokens(example, DataFormat.prompt_completion, ENC) == 11
    assert count_example_tokens(example, "prompt_completion", ENC) == 11


@pytest.mark.parametrize("n, epochs", [
    (1, 25), (3, 25), (5, 20), (10, 10), (33, 3), (34, 3), (100, 3), (8333, 3), (8334, 2), (10_000, 2),
    (12_500, 2), (12_501, 1), (100_000, 1),
])
def test_auto_epochs_rule(n, epochs):
    assert resolve_n_epochs("auto", n) == epochs


@pytest.mark.parametrize("value, expected", [(4, 4), ("4", 4), (1.0, 1), ("AUTO", 3)])
def test_explicit_epochs(value, expected):
    assert resolve_n_epochs(value, 100) == expected


@pytest.mark.parametrize("value", ["three", 0, -1, 51, 2.5, True, None, [3]])
def test_bad_epochs_name_the_key_and_choices(value):
    with pytest.raises(ValueError, match=r"train\.n_epochs=.*`auto` or a whole number from 1 to 50"):
        resolve_n_epochs(value, 100)


def test_cookbook_toy_example():
    """toy_chat_fine_tuning.jsonl: 5 examples, 4,306 billed tokens per epoch → 20 epochs, 86,120 tokens."""
    counts = [900, 850, 880, 826, 850]
    assert sum(counts) == 4306
    estimate = estimate_from_token_counts(make_cfg(), counts)
    assert (estimate["n_examples"], estimate["n_epochs"]) == (5, 20)
    assert estimate["billed_tokens_per_epoch"] == 4306
    assert estimate["billed_tokens"] == 86_120
    assert estimate["training_cost_usd"] == pytest.approx(86_120 / 1000 * 0.008)


def test_announcement_example():
    """A 100,000-token file trained for 3 epochs on gpt-3.5-turbo costs $2.40."""
    estimate = estimate_from_token_counts(make_cfg(n_epochs=3), [1000] * 100)
    assert estimate["billed_tokens"] == 300_000
    assert estimate["training_cost_usd"] == pytest.approx(2.40)
    assert (estimate["fine_tuned_input_per_1k"], estimate["fine_tuned_output_per_1k"]) == (0.012, 0.016)


@pytest.mark.parametrize("model, training, usage", [
    ("gpt-3.5-turbo", 0.008, (0.012, 0.016)), ("babbage-002", 0.0004, (0.0016, 0.0016)),
    ("davinci-002", 0.006, (0.012, 0.012)),
])
def test_published_prices(model, training, usage):
    estimate = estimate_from_token_counts(make_cfg(model=model, fmt="prompt_completion", n_epochs=1), [1000])
    assert estimate["training_cost_usd"] == pytest.approx(training)
    assert (estimate["fine_tuned_input_per_1k"], estimate["fine_tuned_output_per_1k"]) == usage


def test_examples_are_capped_at_the_context_length():
    estimate = estimate_from_token_counts(make_cfg(n_epochs=1), [5000, 100, 4096])
    assert estimate["n_too_long"] == 1
    assert estimate["billed_tokens_per_epoch"] == 4096 + 100 + 4096
    assert estimate["tokens_per_epoch_uncapped"] == 9196


def test_estimate_job_counts_examples():
    examples = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}] * 4
    per_example = (3 + 1 + 1) + (3 + 1 + 2) + 3
    estimate = estimate_job(make_cfg(), examples)
    assert estimate["billed_tokens_per_epoch"] == 4 * per_example
    assert estimate["n_epochs"] == 25 and estimate["billed_tokens"] == 100 * per_example
    assert estimate_job(make_cfg(), examples, n_epochs=2)["n_epochs"] == 2


def test_unknown_model_has_no_price_row():
    with pytest.raises(ValueError, match="pricing.models has no row for model.name='gpt-9'"):
        estimate_from_token_counts(make_cfg(model="gpt-9"), [10])


def test_local_estimate_from_configured_throughput():
    estimate = estimate_from_token_counts(make_cfg(n_epochs=1, local_tokens_per_second=100.0, cpu_hour_usd=0.36),
                                          [3000] * 12)
    local = estimate["local"]
    assert local["throughput_source"] == "pricing.local_tokens_per_second"
    assert local["wall_time_s"] == pytest.approx(360.0)
    assert local["cost_usd"] == pytest.approx(0.036)


def test_local_estimate_from_flops_table():
    # LoRA on a frozen base: 4·N FLOPs per token against peak × MFU for the device
    row = cost.DEVICE_FLOPS["cuda"]
    tps = cost.local_tokens_per_second(1e9, "cuda")
    assert tps == pytest.approx(row["peak_flops"] * row["mfu"] / 4e9)
    cpu = cost.DEVICE_FLOPS["cpu"]
    assert cost.local_tokens_per_second(1.35e8, "cpu", cores=2) == pytest.approx(
        cpu["peak_flops"] * 2 * cpu["mfu"] / (4 * 1.35e8))
    cfg = make_cfg(n_epochs=1)
    cfg.train.device = "cuda"
    local = estimate_from_token_counts(cfg, [4000])["local"]
    assert local["device"] == "cuda" and local["hour_usd"] == 2.0
    assert local["cost_usd"] == pytest.approx(4000 / local["tokens_per_second"] / 3600 * 2.0)


@pytest.mark.parametrize("native_bf16, precision, row", [(True, "auto", "cpu-bf16"), (True, "bf16", "cpu-bf16"),
                                                         (True, "fp32", "cpu"), (False, "auto", "cpu")])
def test_a_cpu_that_computes_bf16_is_estimated_at_bf16_speed(monkeypatch, native_bf16, precision, row):
    monkeypatch.setattr(cost, "cpu_computes_bf16", lambda: native_bf16)
    cfg = make_cfg(n_epochs=1)
    cfg.train.precision = precision
    local = estimate_from_token_counts(cfg, [4000])["local"]
    assert local["tokens_per_second"] == pytest.approx(cost.local_tokens_per_second(1.35e8, row))
    assert local["throughput_source"].endswith(f"({row})")
    assert cost.local_tokens_per_second(1.35e8, "cpu-bf16", cores=2) > 1.5 * cost.local_tokens_per_second(1.35e8, "cpu",
                                                                                                         cores=2)
