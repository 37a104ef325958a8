"""scripts/bench.py plumbing on the tiny Llama: token counting and one ftlab run (no TRL needed)."""
import argparse
import importlib.util
from pathlib import Path

import pytest

from trainer.data.tokenize import collate, pack, tokenize_examples

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench", REPO / "scripts" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny(cache_dir):
    from transformers import AutoTokenizer

    from trainer.backbones import tiny_llama

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_llama(cache_dir)))
    examples = [{"messages": [{"role": "user", "content": "fox " * (i + 1)}, {"role": "assistant", "content": "dog" * (i + 1)}]}
                for i in range(5)]
    return tokenizer, tokenize_examples(list(enumerate(examples)), tokenizer, chat=True, max_length=100)


def test_token_counter_sees_the_same_batch_padded_or_packed(bench, tiny):
    tokenizer, dataset = tiny
    counts = []
    for batch in (collate(dataset.examples, tokenizer.pad_token_id), pack(dataset.examples)):
        counter = bench.TokenCounter(bench.supervised_lookup(dataset))
        counter.add(batch)
        counts.append(counter.record())
    padded, packed = counts
    assert padded["tokens"] == packed["tokens"] == packed["positions"] == dataset.n_tokens
    assert padded["positions"] > padded["tokens"]
    assert padded["supervised_tokens"] == packed["supervised_tokens"] == padded["loss_tokens"] == dataset.n_supervised
    assert padded["examples"] == packed["examples"] == 5 and padded["unmatched_examples"] == 0


def test_ftlab_runner_trains_and_reports(bench, cache_dir):
    args = argparse.Namespace(backbone="tiny-llama", data="json_output", train="default", batch_size=2, steps=4,
                              max_length=128, seed=0, device="cpu", quantization="none", precision="fp32",
                              cache_dir=cache_dir, override=[])
    result = bench.run_ftlab(args, "ftlab")
    assert result["steps"] == 4 and result["examples"] == 8 and result["unmatched_examples"] == 0
    assert result["positions"] == result["tokens"] and result["settings"]["packing"]  # packed: no padding
    assert 0 < result["supervised_tokens"] == result["loss_tokens"] < result["tokens"]
    assert result["heldout_loss"] > 0 and result["peak_rss_mib"] > 0
    times, tokens, supervised = zip(*result["step_marks"])
    assert len(times) == 4 and list(times) == sorted(times) and tokens[-1] == result["tokens"]
    assert supervised[-1] == result["supervised_tokens"] and 0 < tokens[0] < tokens[-1]
    summary = bench.summarise("ftlab", [result], 0.0, "cpu")
    assert summary["padding_fraction"] == 0 and summary["supervised_tokens_per_s"] > 0
    assert summary["steady_tokens_per_s"] > 0


def test_steady_state_leaves_out_the_warm_up_steps(bench):
    # steps end at 10 s (slow first step), 11, 12, 13 s; 100 tokens each
    run = {"step_marks": [(10.0, 100, 50), (11.0, 200, 100), (12.0, 300, 150), (13.0, 400, 200)]}
    assert bench.WARMUP_STEPS == 2
    assert bench.steady_tokens_per_s(run) == pytest.approx(200 / 2.0)  # steps 3 and 4 only
    assert bench.steady_tokens_per_s({"step_marks": run["step_marks"][:3]}) is None  # too short to tell
    assert bench.steady_tokens_per_s({}) is None
