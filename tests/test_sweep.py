"""Multirun sweeps: one run dir per job, a summary of all of them, failures isolated."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

FTLAB = str(Path(sys.executable).with_name("ftlab"))
TINY = ["backbone=tiny-llama", "logger=none", "train.device=cpu", "train.precision=fp32", "train.max_steps=2", "moderation=off"]


def run(*args, cwd, cache_dir):
    env = os.environ | {"HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    return subprocess.run([FTLAB, "train", "-m", *TINY, *args, f"cache_dir={cache_dir}"], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_a_failing_job_does_not_stop_the_sweep_and_shows_in_the_summary(tmp_path, cache_dir):
    sweep = tmp_path / "sweep"
    result = run("train.batch_size=0,4", f"hydra.sweep.dir={sweep}", cwd=tmp_path, cache_dir=cache_dir)
    assert result.returncode == 1, result.stdout + result.stderr  # a job failed
    with open(sweep / "summary.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["job_num"] for r in rows] == ["0", "1"]
    assert [r["status"] for r in rows] == ["failed", "succeeded"]
    assert rows[0]["error"] == "invalid_hyperparameter" and "train.batch_size=0" in rows[0]["overrides"]
    assert float(rows[1]["final_train_loss"]) > 0 and float(rows[1]["final_valid_loss"]) > 0
    assert int(rows[1]["trained_tokens"]) > 0 and float(rows[1]["training_cost_usd"]) > 0
    assert rows[1]["job_id"] == json.loads((sweep / "1" / "job.json").read_text())["id"]
    assert (sweep / "summary.png").stat().st_size > 10_000


def test_optuna_search_minimises_validation_loss(tmp_path, cache_dir):
    sweep = tmp_path / "optuna"
    result = run("hparams_search=optuna", "hydra.sweeper.n_trials=2", f"hydra.sweep.dir={sweep}", cwd=tmp_path,
                 cache_dir=cache_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    best = (sweep / "optimization_results.yaml").read_text()
    with open(sweep / "summary.csv") as handle:
        losses = [float(r["final_valid_loss"]) for r in csv.DictReader(handle)]
    assert len(losses) == 2
    assert f"best_value: {min(losses)}" in best
