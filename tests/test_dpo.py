"""Preference fine-tuning (method=dpo) on the tiny Llama: the file's rules at their lines, the first step's loss
is ln 2 from a base family and from an ft: model, the metrics' record, and jobs.create through the client."""
import csv
import json
import math

import openai
import pytest

from tests.conftest import saved_adapter, write_jsonl
from tests.live_server import live_server
from tests.test_serve import client_for, wait_for
from trainer.data.tokens import get_encoding
from trainer.data.validate import validate_file
from trainer.schema import DataFormat
from trainer.train import FineTuningJob, run_training


def pair(question: str, good: str, bad: str) -> dict:
    return {"input": {"messages": [{"role": "user", "content": question}]},
            "preferred_output": [{"role": "assistant", "content": good}],
            "non_preferred_output": [{"role": "assistant", "content": bad}]}


@pytest.fixture
def pair_files(tmp_path):
    train = write_jsonl(tmp_path / "pairs.jsonl", [pair(f"What is {i} + {i}?", str(2 * i), f"Well, it is {2 * i}.")
                                                   for i in range(10)])
    valid = write_jsonl(tmp_path / "valid.jsonl", [pair(f"What is {i} + 1?", str(i + 1), f"Hmm, {i + 1}.")
                                                   for i in range(3)])
    return train, valid


def dpo_cfg(make_cfg, pair_files, *overrides):
    train, valid = pair_files
    return make_cfg("method=dpo", "data=custom", f"data.train_file={train}", f"data.validation_file={valid}",
                    "train.n_epochs=1", "train.batch_size=5", "lora.dropout=0.0", *overrides)


def test_preference_lines_are_checked_as_the_hosted_service_checks_them(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [
        pair("q", "a", "b"),
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},  # a supervised line
        pair("q", "a", "b") | {"extra": 1},
        {"input": {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "x"}]},
         "preferred_output": [{"role": "assistant", "content": "a"}],
         "non_preferred_output": [{"role": "assistant", "content": "b"}]},
        pair("q", "a", "b") | {"preferred_output": [{"role": "user", "content": "a"}]},
        pair("q", "same", "same"),
    ])
    report = validate_file(path, DataFormat.preference, get_encoding("cl100k_base"), 4096)
    errors = {(issue.line, issue.code) for issue in report.listed("error")}
    assert {(2, "wrong_format"), (3, "unrecognized_preference_key"), (4, "input_ends_with_assistant"),
            (5, "invalid_output")} <= errors
    assert not {line for line, _ in errors} & {1, 6}
    assert (6, "identical_outputs") in {(issue.line, issue.code) for issue in report.listed("warning")}


@pytest.mark.parametrize("from_ft_model", [False, True])
def test_the_first_step_loss_is_ln_2_from_a_family_and_from_an_ft_model(make_cfg, pair_files, tmp_path, from_ft_model):
    """The reference is the policy before training: the backbone, or the parent ft: model's adapter."""
    overrides = []
    if from_ft_model:
        saved_adapter(make_cfg(), tmp_path / "parent", std=0.5)  # a parent whose adapter changes the model
        overrides.append(f"init_adapter={tmp_path / 'parent'}")
    run_dir = tmp_path / "run"
    assert run_training(dpo_cfg(make_cfg, pair_files, *overrides), run_dir) == 0
    rows = list(csv.DictReader(open(run_dir / "results.csv")))
    assert float(rows[0]["train_loss"]) == pytest.approx(math.log(2), abs=1e-4)
    assert float(rows[0]["train_accuracy"]) in (0.0, 0.5, 1.0) or 0 <= float(rows[0]["train_accuracy"]) <= 1
    method_rows = list(csv.DictReader(open(run_dir / "preference_results.csv")))
    assert float(method_rows[0]["train_reward_margin"]) == pytest.approx(0.0, abs=1e-3)
    assert method_rows[-1]["valid_reward_accuracy"] != ""
    job = json.loads((run_dir / "job.json").read_text())
    assert job["hyperparameters"]["beta"] == 0.1


def test_dpo_on_nf4_weights_learns_after_its_no_grad_reference_pass(make_cfg, pair_files, tmp_path):
    """QLoRA's 4-bit backbone (bitsandbytes on a CPU here): the reference pass is a no-grad forward before any
    step, the pass that would break later LoRA gradients on an AVX512-BF16 CPU if repacking were not disarmed."""
    run_dir = tmp_path / "run"
    cfg = dpo_cfg(make_cfg, pair_files, "train.quantization=nf4", "train.n_epochs=3", "train.batch_size=2",
                  "train.learning_rate_multiplier=20")
    assert run_training(cfg, run_dir) == 0
    rows = list(csv.DictReader(open(run_dir / "preference_results.csv")))
    losses = [float(row["train_loss"]) for row in csv.DictReader(open(run_dir / "results.csv"))]
    assert losses[0] == pytest.approx(math.log(2), abs=1e-3)
    assert float(rows[-1]["train_reward_margin"]) > 0.05 and min(losses[-3:]) < losses[0] - 0.02


@pytest.mark.parametrize("packing", ["true", "false"])
def test_a_pair_in_one_row_with_its_prompt_once_trains_as_two_sequences(make_cfg, pair_files, tmp_path, packing):
    """The shared-prompt row (the default) gives the loss, statistics and gradients of the pair's two sequences, padded
    or packed (on a CPU, packed rows run ftlab's own attention), in fewer positions."""
    import torch

    from trainer.data.pairs import pair_batch

    job = FineTuningJob(dpo_cfg(make_cfg, pair_files, f"train.packing={packing}"), tmp_path / "run")
    job.setup()
    assert job.objective.shared_prompt_width is not None
    trainable = [p for p in job.model.parameters() if p.requires_grad]
    with torch.no_grad():
        for parameter in trainable:
            parameter.normal_(0, 0.1)  # a policy that is not the reference: rewards are not 0

    def run(width):
        batch = pair_batch(job.train_data, [0, 3, 7], job.batching.pad_token_id, job.batching.packing,
                           job.batching.row_length, shared_prompt_width=width)
        loss, statistics = job.objective.forward(job.model, batch)
        loss.backward()
        gradients = [p.grad.clone() for p in trainable]
        job.model.zero_grad()
        return loss.item(), statistics, gradients, int((batch["input_ids"] != job.batching.pad_token_id).sum())

    shared, separate = run(job.objective.shared_prompt_width), run(None)
    assert shared[0] == pytest.approx(separate[0], abs=1e-5)
    assert shared[1]["reward_margin"] == pytest.approx(separate[1]["reward_margin"], abs=1e-5)
    assert shared[1]["chosen_reward"] == pytest.approx(separate[1]["chosen_reward"], abs=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(shared[2], separate[2]))
    assert shared[3] < separate[3]


def test_a_dpo_job_through_the_official_client(tmp_path, cache_dir, pair_files):
    overrides = ["backbone=tiny-llama", "logger=none", "train.device=cpu", "train.precision=fp32",
                 f"cache_dir={cache_dir}", "moderation=off"]
    with live_server(tmp_path / "root", overrides) as (url, _):
        client = client_for(url)
        train, valid = (client.files.create(file=open(path, "rb"), purpose="fine-tune").id for path in pair_files)
        with pytest.raises(openai.BadRequestError, match="beta"):
            client.fine_tuning.jobs.create(model="gpt-3.5-turbo", training_file=train,
                                           method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 2.5}}})
        job = client.fine_tuning.jobs.create(model="gpt-3.5-turbo", training_file=train, validation_file=valid,
                                             method={"type": "dpo", "dpo": {"hyperparameters": {
                                                 "beta": 0.2, "n_epochs": 1, "batch_size": 5}}})
        job = wait_for(client, job.id)
        assert job.status == "succeeded", job.error
        assert job.method.type == "dpo" and job.method.dpo.hyperparameters.beta == 0.2
        reply = client.chat.completions.create(model=job.fine_tuned_model, max_tokens=3,
                                               messages=[{"role": "user", "content": "What is 2 + 2?"}])
        assert reply.choices[0].message.content is not None
        supervised_file = write_jsonl(tmp_path / "sft.jsonl", [{"messages": [
            {"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}]} for i in range(10)])
        wrong = client.files.create(file=open(supervised_file, "rb"), purpose="fine-tune").id
        failed = wait_for(client, client.fine_tuning.jobs.create(
            model="gpt-3.5-turbo", training_file=wrong, method={"type": "dpo"}).id)
        assert failed.status == "failed" and failed.error.code == "invalid_training_file"
        assert "preferred_output" in failed.error.message  # names the format the job expects

        # from an SFT ft: model: its adapter is the reference and the start, so the first step's loss is ln 2 again
        sft = wait_for(client, client.fine_tuning.jobs.create(model="gpt-3.5-turbo", training_file=wrong,
                                                              hyperparameters={"n_epochs": 1}).id)
        assert sft.status == "succeeded", sft.error
        chained = wait_for(client, client.fine_tuning.jobs.create(
            model=sft.fine_tuned_model, training_file=train, method={"type": "dpo", "dpo": {"hyperparameters": {
                "n_epochs": 1, "batch_size": 5}}}).id)
        assert chained.status == "succeeded", chained.error
        assert chained.model == sft.fine_tuned_model and chained.fine_tuned_model.startswith("ft:gpt-3.5-turbo")
        first_step = [event for event in client.fine_tuning.jobs.list_events(chained.id, limit=100)
                      if event.type == "metrics" and event.data["step"] == 1]
        assert first_step[0].data["train_loss"] == pytest.approx(math.log(2), abs=1e-3)
        reply = client.chat.completions.create(model=chained.fine_tuned_model, max_tokens=3,
                                               messages=[{"role": "user", "content": "What is 2 + 2?"}])
        assert reply.choices[0].message.content is not None


def test_eval_of_a_dpo_job_reports_its_preferences_beside_the_replies(make_cfg, pair_files, tmp_path, cache_dir):
    from tests.test_chat import train_job, use_cfg
    from trainer.evaluate import evaluate_main

    train, valid = pair_files
    run_dir = train_job(cache_dir, tmp_path, "method=dpo", "data=custom", f"data.train_file={train}",
                        f"data.validation_file={valid}", "lora.dropout=0.0", "train.learning_rate_multiplier=10")
    assert evaluate_main(use_cfg(cache_dir, run_dir, "eval.max_new_tokens=3")) == 0
    report = json.loads((run_dir / "eval.json").read_text())
    base, tuned = report["models"]["base"], report["models"]["fine_tuned"]
    assert 0 <= base["preferred_more_likely"] <= 1 and "reward_accuracy" not in base  # rewards are against the base
    assert tuned["reward_accuracy"] > 0.5 and tuned["reward_margin"] > 0  # trained toward the preferred replies
    assert len(tuned["replies"]) == 3 and report["references"][0] == "1"  # the preferred output is the answer
