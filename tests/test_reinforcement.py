"""Reinforcement fine-tuning (method=reinforcement) on the tiny Llama: the file's rules, the grader checks, a job's
record, sampling from the adapter being trained, the policy gradient's direction, reproducible samples."""
import csv
import json
from pathlib import Path

import pytest
import torch

from tests.conftest import saved_adapter, write_jsonl
from trainer.data.validate import validate_file
from trainer.schema import DataFormat
from trainer.train import FineTuningJob, run_training

GRADER = {"type": "string_check", "name": "right", "operation": "ilike", "input": "{{sample.output_text}}",
          "reference": "{{item.answer}}"}


def rft_line(question: str, answer: str, **more) -> dict:
    return {"messages": [{"role": "developer", "content": "Answer briefly."}, {"role": "user", "content": question}],
            "answer": answer, **more}


@pytest.fixture
def rft_files(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [rft_line(f"What is {i} + {i}?", str(2 * i)) for i in range(6)])
    valid = write_jsonl(tmp_path / "valid.jsonl", [rft_line(f"What is {i} + 1?", str(i + 1)) for i in range(3)])
    grader = tmp_path / "grader.json"
    grader.write_text(json.dumps(GRADER))
    return train, valid, grader


def rft_cfg(make_cfg, rft_files, *overrides):
    train, valid, grader = rft_files
    return make_cfg("method=reinforcement", "data=custom", f"data.train_file={train}", f"data.validation_file={valid}",
                    f"method.reinforcement.grader={grader}", "method.reinforcement.group_size=4",
                    "method.reinforcement.max_new_tokens=6", "train.n_epochs=1", "train.batch_size=2",
                    "train.eval_every=2", *overrides)


def test_the_file_rules_at_their_lines(tmp_path):
    path = write_jsonl(tmp_path / "rft.jsonl", [
        rft_line("fine", "1"),
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},  # a supervised line
        {"messages": [{"role": "system", "content": "s"}], "answer": "1"},  # ends with the system's
        {"messages": [{"role": "function", "content": "f", "name": "x"}, {"role": "user", "content": "q"}]},
        {"answer": "1"},
        {"messages": [{"role": "user", "content": "q"}]},  # no item fields: a warning
    ])
    report = validate_file(path, DataFormat.reinforcement, __import__("trainer.data.tokens", fromlist=["x"])
                           .get_encoding("cl100k_base"), 4096)
    codes = {(issue.line, issue.code) for issue in report.listed("error")}
    assert (2, "wrong_format") in codes and (3, "last_message_not_user") in codes
    assert (4, "unrecognized_role") in codes and (5, "missing_messages_list") in codes
    assert not {line for line, _ in codes} & {1, 6}
    assert (6, "no_item_fields") in {(issue.line, issue.code) for issue in report.listed("warning")}


@pytest.mark.parametrize("override,code", [
    ("data.validation_file=null", "invalid_validation_file"),
    ("method.reinforcement.compute_multiplier=0", "invalid_hyperparameter"),
    ("method.reinforcement.reasoning_effort=extreme", "invalid_hyperparameter"),
    ("model=babbage-002", "invalid_method"),
])
def test_settings_that_cannot_work_fail_before_a_model_loads(make_cfg, rft_files, tmp_path, override, code,
                                                             monkeypatch):
    monkeypatch.setattr("trainer.train.load_base_model", lambda *a: pytest.fail("loaded a model"))
    run_dir = tmp_path / "run"
    assert run_training(rft_cfg(make_cfg, rft_files, override), run_dir) == 1
    assert json.loads((run_dir / "job.json").read_text())["error"]["code"] == code


def test_a_grader_that_does_not_validate_or_reads_a_missing_field_fails_the_job(make_cfg, rft_files, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(GRADER | {"operation": "sounds_like"}))
    assert run_training(rft_cfg(make_cfg, rft_files, f"method.reinforcement.grader={bad}"), tmp_path / "a") == 1
    error = json.loads((tmp_path / "a" / "job.json").read_text())["error"]
    assert error["code"] == "invalid_grader" and "operation" in error["message"]
    reads = tmp_path / "reads.json"
    reads.write_text(json.dumps(GRADER | {"reference": "{{item.solution}}"}))
    assert run_training(rft_cfg(make_cfg, rft_files, f"method.reinforcement.grader={reads}"), tmp_path / "b") == 1
    error = json.loads((tmp_path / "b" / "job.json").read_text())["error"]
    assert error["code"] == "missing_item_field" and "train.jsonl:1" in error["message"]


def test_a_job_records_rewards_hyperparameters_and_sampled_answers(make_cfg, rft_files, tmp_path):
    run_dir = tmp_path / "run"
    cfg = rft_cfg(make_cfg, rft_files, "method.reinforcement.kl_coef=0.05", "method.reinforcement.compute_multiplier=0.5",
                  "train.micro_batch_size=2")  # a group a micro-batch
    assert run_training(cfg, run_dir) == 0
    job = json.loads((run_dir / "job.json").read_text())
    assert job["status"] == "succeeded" and job["fine_tuned_model"].startswith("ft:gpt-3.5-turbo:")
    assert job["hyperparameters"].items() >= {"compute_multiplier": 0.5, "samples_per_prompt": 2, "eval_interval": 2,
                                              "reasoning_effort": "default", "batch_size": 2,
                                              "learning_rate": 2e-4}.items()
    rows = list(csv.DictReader(open(run_dir / "reward_results.csv")))
    assert [row["step"] for row in rows] == ["1", "2", "3"]
    assert all(0 <= float(row["train_reward_mean"]) <= 1 and float(row["train_kl"]) >= 0 for row in rows)
    assert rows[1]["valid_reward_mean"] and rows[2]["valid_reward_mean"] and not rows[0]["valid_reward_mean"]
    hosted = list(csv.DictReader(open(run_dir / "results.csv")))
    assert hosted[0]["train_accuracy"] == rows[0]["train_reward_mean"]  # the hosted column holds the mean reward
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    shown = [e for e in events if e["message"].startswith("Sampled answers")]
    assert len(shown) == 2 and {"line", "prompt", "reply", "reward"} <= shown[0]["data"]["samples"][0].keys()
    metrics = [e["data"] for e in events if e["type"] == "metrics"]
    assert "valid_reward_mean" in metrics[-1] and "train_reward_mean" in metrics[0]


def test_rollouts_come_from_the_adapter_being_trained(make_cfg, rft_files, tmp_path):
    job = FineTuningJob(rft_cfg(make_cfg, rft_files), tmp_path / "run")
    job.setup()
    objective, model = job.objective, job.model
    torch.manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)  # as if trained: the adapter now changes the replies
    prompts = job.train_data.examples[:2]
    sampled = [group[0].token_ids for group in objective._sample(prompts, [0, 0], 1, 0.0)]
    model.eval()
    with torch.no_grad():
        tuned = [_greedy(model, p.prompt_ids, len(ids)) for p, ids in zip(prompts, sampled)]
        with model.disable_adapter():
            base = [_greedy(model, p.prompt_ids, len(ids)) for p, ids in zip(prompts, sampled)]
    assert sampled == tuned and sampled != base


def _greedy(model, prompt_ids: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt_ids])
    for _ in range(n):
        ids = torch.cat([ids, model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[0, len(prompt_ids):].tolist()


def test_the_same_seeds_give_the_same_samples(make_cfg, rft_files, tmp_path):
    job = FineTuningJob(rft_cfg(make_cfg, rft_files), tmp_path / "run")
    job.setup()
    prompts = job.train_data.examples[:2]
    first = [[c.token_ids for c in group] for group in job.objective._sample(prompts, [5, 6], 4, 1.0)]
    again = [[c.token_ids for c in group] for group in job.objective._sample(prompts, [5, 6], 4, 1.0)]
    other = [[c.token_ids for c in group] for group in job.objective._sample(prompts, [7, 8], 4, 1.0)]
    assert first == again and first != other


def test_the_policy_gradient_raises_the_rewarded_reply_and_lowers_the_other(make_cfg, rft_files, tmp_path):
    from trainer.methods.reinforcement import shared_prompt_rows

    job = FineTuningJob(rft_cfg(make_cfg, rft_files), tmp_path / "run")
    job.setup()
    objective, model = job.objective, job.model
    batch = shared_prompt_rows([(job.train_data.examples[0].prompt_ids, [[5, 6, 7], [8, 9, 10]])], 0)
    batch |= {"advantage": torch.tensor([1.0, -1.0]), "reward": torch.tensor([1.0, 0.0]),
              "completion_tokens": torch.tensor([3.0, 3.0]), "grader_errors": torch.zeros(2),
              "grader_seconds": torch.zeros(2)}

    def reply_log_probs() -> torch.Tensor:
        from trainer.loss import supervised_outputs, token_log_probs

        with torch.no_grad():
            outputs, targets, _, head = supervised_outputs(model, batch)
            return token_log_probs(outputs, targets, head).view(2, 3).sum(1)

    before = reply_log_probs()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for _ in range(3):
        loss, statistics = objective.forward(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = reply_log_probs()
    assert after[0] > before[0] and after[1] < before[1]
    assert statistics["reward"] == 1.0 and statistics["completion_tokens"] == 6.0


def test_the_bundled_sample_and_its_grader_validate(make_cfg):
    from trainer.hyperparams import check_job_settings

    check_job_settings(make_cfg("method=reinforcement", "data=rft"))  # raises if the sample's grader were invalid
    grader = json.loads((Path("trainer/samples/rft/grader.json")).read_text())
    assert grader["type"] == "multi" and {g["type"] for g in grader["graders"].values()} == {"string_check", "python"}


def test_a_continued_ft_model_is_its_own_kl_reference(make_cfg, rft_files, tmp_path):
    """model=ft:…: the parent's adapter is where the policy starts and what the KL term measures from."""
    from trainer.loss import supervised_outputs, token_log_probs

    saved_adapter(make_cfg(), tmp_path / "parent", std=0.5)
    job = FineTuningJob(rft_cfg(make_cfg, rft_files, f"init_adapter={tmp_path / 'parent'}",
                                "method.reinforcement.kl_coef=0.1"), tmp_path / "run")
    job.setup()
    batch = next(job.objective.split(next(job.objective.batches(job.train_data, 2, 0, job.batching)), None))
    with torch.no_grad():
        outputs, targets, _, head = supervised_outputs(job.model, batch)
        policy = token_log_probs(outputs, targets, head)
        with job.model.disable_adapter():
            outputs, targets, _, head = supervised_outputs(job.model, batch)
            base = token_log_probs(outputs, targets, head)
    reference = job.objective._reference_log_probs(job.model, batch)
    assert torch.allclose(reference, policy, atol=1e-5) and not torch.allclose(reference, base, atol=1e-2)
    _, statistics = job.objective.forward(job.model, batch)
    assert abs(statistics["kl"]) < 1e-5  # the first step's policy is the reference
    assert torch.allclose(job.objective._reference_log_probs(job.model, batch), reference)  # weights put back


def test_a_cancelled_and_resumed_job_samples_and_ends_as_an_uninterrupted_one(make_cfg, rft_files, tmp_path,
                                                                              monkeypatch):
    import signal

    from safetensors.torch import load_file

    cfg = rft_cfg(make_cfg, rft_files, "train.learning_rate_multiplier=20")  # moves the adapter: samples tell
    assert run_training(cfg, tmp_path / "reference") == 0
    original, calls = FineTuningJob._optimizer_step, []

    def step_then_signal(self, batch):
        calls.append(1)
        if len(calls) == 2:
            signal.raise_signal(signal.SIGTERM)  # stops before step 2: the cancel checkpoints step 1
        return original(self, batch)

    monkeypatch.setattr(FineTuningJob, "_optimizer_step", step_then_signal)
    assert run_training(cfg, tmp_path / "cut") == 130
    monkeypatch.setattr(FineTuningJob, "_optimizer_step", original)
    assert run_training(cfg, tmp_path / "cut", resume=True) == 0

    def replies(run_dir):
        with open(run_dir / "reward_results.csv") as handle:
            return [(row["step"], row["train_completion_tokens"], row["train_reward_mean"])
                    for row in csv.DictReader(handle)]

    assert replies(tmp_path / "cut") == replies(tmp_path / "reference")
    expected, got = (load_file(path / "adapter" / "adapter_model.safetensors")
                     for path in (tmp_path / "reference", tmp_path / "cut"))
    assert all(torch.allclose(expected[name], got[name], atol=1e-6) for name in expected)


def test_a_shared_prompt_row_trains_exactly_as_one_row_a_reply(make_cfg, rft_files, tmp_path):
    """Each group's prompt computed once (its replies attend to it through the mask) gives the loss, the statistics
    and the gradients of one padded row a reply, and fewer positions."""
    from trainer.methods.reinforcement import padded_rows, shared_prompt_rows

    job = FineTuningJob(rft_cfg(make_cfg, rft_files, "method.reinforcement.kl_coef=0.1"), tmp_path / "run")
    job.setup()
    prompts = [p.prompt_ids for p in job.train_data.examples[:2]]
    pieces = [(prompts[0], [[5, 6, 7], [8, 9], [10]]), (prompts[1], [[11, 12, 13, 14], [15], [16, 17]])]
    extra = {"advantage": torch.tensor([1.0, -0.5, 0.2, -1.0, 0.7, 0.3]), "reward": torch.rand(6),
             "completion_tokens": torch.ones(6), "grader_errors": torch.zeros(6), "grader_seconds": torch.zeros(6)}
    trainable = [p for p in job.model.parameters() if p.requires_grad]
    with torch.no_grad():
        for parameter in trainable:
            parameter.normal_(0, 0.1)  # an adapter that is not the reference: the KL term is not 0

    def run(layout):
        rows = layout(pieces, 0) | extra
        loss, statistics = job.objective.forward(job.model, rows)
        loss.backward()
        gradients = [p.grad.clone() for p in trainable]
        job.model.zero_grad()
        return loss.item(), statistics, gradients, rows["input_ids"].numel()

    shared, padded = run(shared_prompt_rows), run(padded_rows)
    assert shared[0] == pytest.approx(padded[0], abs=1e-5) and shared[1]["kl"] == pytest.approx(padded[1]["kl"], abs=1e-6)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(shared[2], padded[2]))
    assert shared[3] < padded[3]
