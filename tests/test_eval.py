"""eval: task metrics score what they claim; on a tiny job, eval.json holds base vs fine-tuned with the
loss training reported, the long-prompt comparison and its prices; plus one end-to-end run on SmolLM2."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tests.test_chat import tiny_chat_job, use_cfg  # noqa: F401 - the fixture
from trainer.evaluate import (
    evaluate_main,
    split_example,
    task_metrics,
    with_instructions,
    without_instructions,
)

EVAL = OmegaConf.create({"max_words": 6, "signoff": "— The Brightbean crew ☕"})


def test_json_metrics():
    reference = '{"name":"Ada","company":null,"email":"a@x.org","city":"Porto"}'
    replies = [reference,  # exact
               '{"name": "Ada", "company": null, "email": "a@x.org", "city": "Lisbon"}',  # schema ok, 3/4 fields
               '{"name":"Ada","email":"a@x.org"}',  # valid, wrong schema
               'Sure! {"name":"Ada"}']  # not JSON
    metrics = task_metrics("json", replies, [reference] * 4, EVAL)
    assert metrics["json_valid"] == 0.75 and metrics["schema_match"] == 0.5 and metrics["exact_match"] == 0.25
    assert metrics["field_accuracy"] == pytest.approx((4 + 3 + 2) / 16)


def test_terse_tone_and_exact_metrics():
    terse = task_metrics("terse", ["52", "There are fifty-two weeks in a year."], ["52", "52"], EVAL)
    assert terse["terse_rate"] == 0.5 and terse["exact_match"] == 0.5 and terse["mean_words"] == 4.0
    tone = task_metrics("tone", ["Sure thing! — The Brightbean crew ☕", "Sure thing!"], ["x", "y"], EVAL)
    assert tone["signoff_rate"] == 0.5
    exact = task_metrics("exact", [" billing", "Billing.", "shipping"], [" billing\n"] * 3, EVAL)
    assert exact["exact_match"] == pytest.approx(2 / 3)
    preference = task_metrics("preference", ["Stockholm.", "The capital of Sweden is Stockholm, a city on fourteen "
                                             "islands.", "Oslo."], ["Stockholm."] * 3, EVAL)
    assert preference["fact_kept_rate"] == pytest.approx(2 / 3) and preference["terse_rate"] == pytest.approx(2 / 3)


def test_prompts_for_the_comparison():
    example = {"messages": [{"role": "system", "content": "Extract."}, {"role": "user", "content": "Ada, Porto"},
                            {"role": "assistant", "content": "{}"}]}
    prompt, reference = split_example(example, chat=True)
    assert reference == "{}" and [m["role"] for m in prompt] == ["system", "user"]
    long = with_instructions(prompt, "LONG", chat=True)
    assert long[0] == {"role": "system", "content": "LONG"} and len(long) == 2
    assert without_instructions(prompt, chat=True) == [{"role": "user", "content": "Ada, Porto"}]
    assert with_instructions("Ticket\n\n###\n\n", "LONG", chat=False) == "LONG\n\nTicket\n\n###\n\n"


def test_eval_writes_eval_json_and_chart(tiny_chat_job, cache_dir, capsys):  # noqa: F811
    instructions = "Answer with the number only, in digits, with no words, no sentence and no punctuation at all."
    cfg = use_cfg(cache_dir, tiny_chat_job, "eval.max_examples=3", "eval.max_new_tokens=4", "eval.batch_size=2",
                  f"eval.instructions.exact='{instructions}'")
    assert evaluate_main(cfg) == 0
    report = json.loads((tiny_chat_job / "eval.json").read_text())
    assert (tiny_chat_job / "eval.png").stat().st_size > 0
    base, tuned = report["models"]["base"], report["models"]["fine_tuned"]
    assert report["n_examples"] == 4 and report["n_generated"] == 3 and report["task"] == "exact"
    assert len(base["replies"]) == len(tuned["replies"]) == 3
    # the fine-tuned loss is the loss training reported at its last step (same tokens, masks, function)
    with open(tiny_chat_job / "results.csv") as handle:
        last = list(csv.DictReader(handle))[-1]
    assert tuned["valid_loss"] == pytest.approx(float(last["valid_loss"]), abs=1e-4)
    assert base["valid_loss"] != tuned["valid_loss"]
    comparison = report["prompt_comparison"]
    long, short = comparison["base_long_prompt"], comparison["fine_tuned_no_prompt"]
    assert comparison["prompt_tokens_saved_per_request"] == long["prompt_tokens_per_request"] - \
        short["prompt_tokens_per_request"] > 0
    # gpt-3.5-turbo: base model usage at $0.0015/$0.002, the fine-tuned model at $0.012/$0.016 per 1K tokens
    assert long["price_per_1k_tokens"] == {"input": 0.0015, "output": 0.002}
    assert short["price_per_1k_tokens"] == {"input": 0.012, "output": 0.016}
    assert short["usd_per_1k_requests"] == pytest.approx(
        short["prompt_tokens_per_request"] * 0.012 + short["output_tokens_per_request"] * 0.016)
    out = capsys.readouterr().out
    assert "valid_loss" in out and "Shorter prompts" in out and "eval.json" in out


def test_eval_needs_a_validation_file(tiny_chat_job, cache_dir, capsys):  # noqa: F811
    override = "data.validation_file=/nonexistent.jsonl"
    assert evaluate_main(use_cfg(cache_dir, tiny_chat_job, override), (override,)) == 2
    assert "file not found" in capsys.readouterr().err


@pytest.mark.e2e
def test_train_chat_eval_on_the_embedded_backbone(tmp_path):
    """The real thing on SmolLM2-135M: train 2 steps, one chat reply, eval on 2 examples (~60 s)."""
    ftlab = str(Path(sys.executable).with_name("ftlab"))
    env = os.environ | {"HF_HUB_OFFLINE": "1", "FTLAB_OUTPUTS": str(tmp_path / "outputs")}
    run_dir = tmp_path / "outputs" / "train" / "job"

    def run(*args):
        result = subprocess.run([ftlab, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        return result.stdout

    run("train", "logger=none", "train.max_steps=2", f"hydra.run.dir={run_dir}")
    job = json.loads((run_dir / "job.json").read_text())
    reply = run("chat", f"job={job['fine_tuned_model']}", "system=Extract the contact as JSON.",
                "prompt=Hi, I'm Nadia Brennan, based in Hamburg: nadia@example.org", "generation.max_new_tokens=40")
    assert reply.strip()
    run("eval", "job=latest", "eval.max_examples=2", "eval.max_new_tokens=40")
    report = json.loads((run_dir / "eval.json").read_text())
    assert report["job"] == job["id"] and report["task"] == "json"
    assert report["models"]["fine_tuned"]["valid_loss"] < report["models"]["base"]["valid_loss"]
    assert report["prompt_comparison"]["prompt_reduction"] > 0.5
    assert not (tmp_path / ".hydra").exists() and not list(tmp_path.glob("*.log"))  # use verbs leave nothing behind
