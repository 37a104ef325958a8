"""method=reinforcement through `ftlab serve` and the official openai client: the issue's script (try a multi grader,
create a job with it, see valid_reward_mean in the events, call the ft: model), and what create refuses."""
import json
from pathlib import Path

import openai
import pytest

from tests.conftest import write_jsonl
from tests.live_server import live_server
from tests.test_serve import client_for, wait_for

GRADER = {"type": "multi", "name": "right_and_short", "calculate_output": "0.5 * right + 0.5 * short",
          "graders": {"right": {"type": "string_check", "name": "right", "operation": "ilike",
                                "input": "{{sample.output_text}}", "reference": "{{item.answer}}"},
                      "short": {"type": "python", "name": "short",
                                "source": "def grade(sample, item):\n"
                                          "    return float(len(sample['output_text'].split()) <= 3)\n"}}}


@pytest.fixture
def rft_overrides(cache_dir):
    return ["backbone=tiny-llama", "logger=none", "train.device=cpu", "train.precision=fp32", f"cache_dir={cache_dir}",
            "moderation=off", "method.reinforcement.group_size=4", "method.reinforcement.max_new_tokens=4"]


@pytest.fixture
def prompt_files(tmp_path):
    line = lambda i: {"messages": [{"role": "user", "content": f"What is {i} + {i}?"}], "answer": str(2 * i)}  # noqa: E731
    return (write_jsonl(tmp_path / "train.jsonl", [line(i) for i in range(10)]),
            write_jsonl(tmp_path / "valid.jsonl", [line(i) for i in range(10, 12)]))


def test_try_a_grader_train_with_it_and_call_the_model(tmp_path, rft_overrides, prompt_files):
    with live_server(tmp_path / "root", rft_overrides) as (url, server):
        client = client_for(url)
        tried = client.fine_tuning.alpha.graders.run(grader=GRADER, model_sample="4", item={"answer": "4"})
        assert tried.reward == 1.0 and tried.metadata.errors.python_grader_runtime_error is False
        train, valid = (client.files.create(file=open(path, "rb"), purpose="fine-tune") for path in prompt_files)
        job = client.fine_tuning.jobs.create(
            model="gpt-3.5-turbo", training_file=train.id, validation_file=valid.id,
            method={"type": "reinforcement", "reinforcement": {"grader": GRADER, "hyperparameters": {
                "n_epochs": 1, "batch_size": 5, "eval_interval": 1, "compute_multiplier": 0.5,
                "reasoning_effort": "low"}}})
        assert job.method.type == "reinforcement" and job.method.reinforcement.grader.name == "right_and_short"
        job = wait_for(client, job.id)
        assert job.status == "succeeded", job.error
        used = job.method.reinforcement.hyperparameters
        assert (used.compute_multiplier, used.eval_interval, used.reasoning_effort, used.batch_size) == \
            (0.5, 1, "low", 5)
        metrics = [e.data for e in client.fine_tuning.jobs.list_events(job.id, limit=100).data if e.type == "metrics"]
        assert len(metrics) == 2 and all("valid_reward_mean" in m and "train_reward_mean" in m for m in metrics)
        reply = client.chat.completions.create(model=job.fine_tuned_model, max_tokens=4,
                                               messages=[{"role": "user", "content": "What is 2 + 2?"}])
        assert reply.choices[0].message.content is not None


def test_create_refuses_what_cannot_train(tmp_path, rft_overrides, prompt_files):
    with live_server(tmp_path / "root", rft_overrides) as (url, _):
        client = client_for(url)
        train, valid = (client.files.create(file=open(path, "rb"), purpose="fine-tune").id for path in prompt_files)

        def refused(**method) -> openai.BadRequestError:
            with pytest.raises(openai.BadRequestError) as caught:
                client.fine_tuning.jobs.create(model="gpt-3.5-turbo", training_file=train,
                                               validation_file=method.pop("validation_file", valid), method=method)
            return caught.value

        error = refused(type="reinforcement", reinforcement={"grader": GRADER | {"calculate_output": "right + os"}})
        assert error.code == "invalid_grader" and error.param.startswith("method.reinforcement.grader")
        error = refused(type="reinforcement", reinforcement={"grader": GRADER}, validation_file=None)
        assert error.code == "invalid_validation_file" and error.param == "validation_file"
        error = refused(type="reinforcement", reinforcement={"grader": GRADER,
                                                               "hyperparameters": {"compute_multiplier": 11}})
        assert "compute_multiplier" in str(error)
        error = refused(type="dpo", reinforcement={"grader": GRADER})
        assert "method.reinforcement" in str(error)
        error = refused(type="dpo", dpo={"hyperparameters": {"beta": 2.5}})
        assert "beta" in str(error)


def test_a_grader_is_data_never_config(tmp_path, rft_overrides, prompt_files, monkeypatch):
    """`${...}` in a grader's strings reaches the grader as the client wrote it: nothing is interpolated."""
    monkeypatch.setenv("FTLAB_API_KEY", "sk-secret-not-to-leak")
    sneaky = {"type": "string_check", "name": "${oc.env:FTLAB_API_KEY}", "operation": "eq",
              "input": "{{sample.output_text}}", "reference": "${oc.env:HOME}"}
    with live_server(tmp_path / "root", rft_overrides) as (url, server):
        client = client_for(url, "sk-secret-not-to-leak")  # the server takes its key from the environment
        train, valid = (client.files.create(file=open(path, "rb"), purpose="fine-tune").id for path in prompt_files)
        job = client.fine_tuning.jobs.create(model="gpt-3.5-turbo", training_file=train, validation_file=valid,
                                             method={"type": "reinforcement", "reinforcement": {"grader": sneaky,
                                                     "hyperparameters": {"n_epochs": 1, "batch_size": 10}}})
        job = wait_for(client, job.id)
        assert job.status == "succeeded", job.error
        assert job.method.reinforcement.grader.name == "${oc.env:FTLAB_API_KEY}"
        run_dir = next((tmp_path / "root" / "jobs").iterdir())
        recorded = json.loads((run_dir / "request.json").read_text())["grader"]
        assert recorded == sneaky
        assert "sk-secret-not-to-leak" not in "".join(p.read_text(errors="ignore") for p in Path(run_dir).rglob("*")
                                                      if p.is_file() and p.suffix in (".json", ".jsonl", ".csv"))
