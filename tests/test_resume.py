"""Losing nothing: resume after kill -9, corrupt checkpoints, locks, NaN guard, out-of-memory advice."""
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import chat_example, kill_after_checkpoint, write_jsonl
from trainer.run import RunLock, cancel_job
from trainer.train import FineTuningJob, run_training

FTLAB = str(Path(sys.executable).with_name("ftlab"))


def losses(run_dir: Path) -> dict[int, float]:
    with open(run_dir / "results.csv") as handle:
        return {int(r["step"]): float(r["train_loss"]) for r in csv.DictReader(handle)}


def ftlab(*args, cwd, cache_dir, **kwargs):
    # One thread each: two training processes side by side on 2 cores must not oversubscribe them.
    env = os.environ | {"HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([FTLAB, *args, f"cache_dir={cache_dir}"], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kwargs)


@pytest.fixture
def long_job(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [chat_example(f"Spell {i} in words", f"number {i}") for i in range(24)])
    return ["backbone=tiny-llama", "logger=none", "train.device=cpu", "train.precision=fp32", "data=custom", f"data.train_file={train}",
            "train.n_epochs=4", "train.batch_size=2", "train.checkpoint_every=3", "train.keep_checkpoints=2",
            "moderation=off"]


def test_resume_after_kill_9_matches_an_uninterrupted_run(tmp_path, cache_dir, long_job):
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    done = ftlab("train", *long_job, f"hydra.run.dir={reference}", cwd=tmp_path, cache_dir=cache_dir)
    victim = ftlab("train", *long_job, f"hydra.run.dir={killed}", cwd=tmp_path, cache_dir=cache_dir)
    kill_after_checkpoint(victim, killed, "step-00000[6-9]", timeout=120)
    assert done.wait(timeout=240) == 0, done.stdout.read()
    assert json.loads((killed / "job.json").read_text())["status"] == "running"  # killed mid-run, no chance to record
    steps_before = max(losses(killed))
    assert steps_before < 48
    resumed = ftlab("train", f"resume={killed}", cwd=tmp_path, cache_dir=cache_dir)
    output = resumed.communicate(timeout=240)[0]
    assert resumed.returncode == 0, output
    expected, got = losses(reference), losses(killed)
    assert sorted(got) == list(range(1, 49)) and sorted(expected) == list(range(1, 49))  # no duplicate or missing step
    for step in expected:
        assert got[step] == pytest.approx(expected[step], abs=1e-4), f"step {step}"
    job = json.loads((killed / "job.json").read_text())
    assert job["status"] == "succeeded"
    metrics_steps = [json.loads(line)["data"]["step"] for line in (killed / "events.jsonl").read_text().splitlines()
                     if json.loads(line)["type"] == "metrics"]
    assert sorted(metrics_steps) == list(range(1, 49))
    assert not (killed / ".lock").exists()


def test_a_corrupt_checkpoint_is_skipped_with_a_warning(make_cfg, tmp_path, long_job):
    run_dir = tmp_path / "run"
    cfg = make_cfg(*[o for o in long_job if not o.startswith(("backbone", "logger", "train.device"))], "train.max_steps=6")
    assert run_training(cfg, run_dir) == 0
    newest = run_dir / "checkpoints" / "step-000006" / "trainer_state.pt"
    newest.write_bytes(newest.read_bytes()[:100])  # half-written
    job = FineTuningJob(cfg, run_dir, resume=True)
    job.setup()
    assert job.step == 3 and job.position == (0, 3)
    events = (run_dir / "events.jsonl").read_text()
    assert "Skipped unreadable checkpoint step-000006" in events and "Resumed from checkpoint step-000003" in events


def test_second_train_into_a_running_dir_refuses_and_stale_locks_clear(make_cfg, chat_files, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (run_dir / ".lock").write_text(json.dumps({"pid": sleeper.pid, "host": os.uname().nodename, "started": 0}))
        train, valid = chat_files
        cfg = make_cfg("data=custom", f"data.train_file={train}", "train.max_steps=1")
        assert run_training(cfg, run_dir) == 1
        assert not (run_dir / "job.json").exists()  # the running job's record is not touched
        assert RunLock(run_dir).holder()["pid"] == sleeper.pid
    finally:
        sleeper.kill()
        sleeper.wait()
    assert RunLock(run_dir).holder() is None  # dead pid: stale
    assert run_training(cfg, run_dir) == 0
    assert not (run_dir / ".lock").exists()


def test_jobs_cancel_stops_a_running_job_cleanly(tmp_path, cache_dir, long_job):
    run_dir = tmp_path / "run"
    process = ftlab("train", *long_job, "train.n_epochs=50", "train.batch_size=1", f"hydra.run.dir={run_dir}", cwd=tmp_path,
                    cache_dir=cache_dir)
    deadline = time.time() + 120
    while not (run_dir / "results.csv").exists() and time.time() < deadline:
        time.sleep(0.05)
    job_id = json.loads((run_dir / "job.json").read_text())["id"]
    cancel = subprocess.run([FTLAB, "jobs", "cancel", job_id, f"root={tmp_path}"], capture_output=True, text=True,
                            timeout=60)
    assert cancel.returncode == 0 and f"pid {process.pid}" in cancel.stdout, cancel.stdout + cancel.stderr
    output = process.communicate(timeout=120)[0]
    assert process.returncode == 130, output
    job = json.loads((run_dir / "job.json").read_text())
    assert job["status"] == "cancelled"
    assert list((run_dir / "checkpoints").glob("step-*"))
    assert cancel_job(run_dir) is None  # nothing running any more


def test_nonfinite_steps_are_skipped_then_fail_the_job(make_cfg, chat_files, tmp_path, monkeypatch):
    import trainer.loss as loss_module

    real = loss_module.token_loss_and_accuracy
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss, n, correct = real(*args, **kwargs)
        return (loss * float("nan") if calls["n"] in (2, 4, 5, 6) else loss), n, correct

    monkeypatch.setattr(loss_module, "token_loss_and_accuracy", poisoned)
    train, valid = chat_files
    cfg = make_cfg("data=custom", f"data.train_file={train}", "train.n_epochs=5", "train.batch_size=2",
                   "train.checkpoint_every=1", "train.max_nonfinite_steps=3")
    run_dir = tmp_path / "run"
    assert run_training(cfg, run_dir) == 1
    job = json.loads((run_dir / "job.json").read_text())
    assert job["status"] == "failed" and job["error"]["code"] == "nonfinite_loss"
    assert list(losses(run_dir)) == [1, 2]  # forward 2 skipped; 3 trained as step 2; 4, 5, 6 skipped → fail
    warnings = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()
                if "non-finite" in line and json.loads(line)["level"] == "warn"]
    assert [w["data"]["nonfinite_in_a_row"] for w in warnings] == [1, 1, 2, 3]
    assert (run_dir / "checkpoints" / "step-000002" / "adapter").is_dir()  # last good checkpoint kept


def test_out_of_memory_names_the_knobs(make_cfg, chat_files, tmp_path, monkeypatch):
    def out_of_memory(self, batch):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(FineTuningJob, "_optimizer_step", out_of_memory)
    train, valid = chat_files
    run_dir = tmp_path / "run"
    assert run_training(make_cfg("data=custom", f"data.train_file={train}"), run_dir) == 1
    error = json.loads((run_dir / "job.json").read_text())["error"]
    assert error["code"] == "out_of_memory"
    for knob in ["train.micro_batch_size", "train.gradient_checkpointing", "train.max_length", "train.quantization=nf4"]:
        assert knob in error["message"]


def test_results_csv_grows_a_line_a_step_and_a_resume_drops_the_rows_past_its_checkpoint(tmp_path):
    from trainer.run import ResultsTable

    path = tmp_path / "results.csv"
    path.write_text("step,train_loss\n1,9.0\n2,9.0\n")  # a previous run's rows: this run replaces them
    table = ResultsTable(path)
    for step in range(1, 6):
        table.add({"step": step, "train_loss": step / 10})
        rows = list(csv.DictReader(path.open()))
        assert [int(r["step"]) for r in rows] == list(range(1, step + 1))  # readable after every step
    assert rows[-1]["train_loss"] == "0.5" and rows[0]["valid_loss"] == ""
    with path.open("a") as handle:
        handle.write("1")  # step 12's line, cut short by a crash: not a second step 1
    resumed = ResultsTable(path)
    resumed.load(until_step=3)
    assert [r["step"] for r in resumed.rows] == [1, 2, 3] and resumed.rows[2]["train_loss"] == 0.3
    assert [int(r["step"]) for r in csv.DictReader(path.open())] == [1, 2, 3]  # dropped on disk at once
    resumed.add({"step": 4, "train_loss": 0.4})
    assert [int(r["step"]) for r in csv.DictReader(path.open())] == [1, 2, 3, 4]
