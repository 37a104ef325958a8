"""The `ftlab` console script as users run it: verbs, overrides, run dirs, multirun, errors."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

FTLAB = str(Path(sys.executable).with_name("ftlab"))
TINY = ["backbone=tiny-llama", "logger=none", "train.device=cpu", "train.precision=fp32"]


def ftlab(*args, cwd: Path, cache: str, timeout: int = 240) -> subprocess.CompletedProcess:
    env = os.environ | {"HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    return subprocess.run([FTLAB, *args, f"cache_dir={cache}"], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_train_leaves_a_complete_run_dir(tmp_path, cache_dir):
    run_dir = tmp_path / "D"
    result = ftlab("train", *TINY, "train.max_steps=3", f"hydra.run.dir={run_dir}", cwd=tmp_path, cache=cache_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    for name in [".hydra/config.yaml", ".hydra/overrides.yaml", "job.json", "events.jsonl", "results.csv",
                 "estimate.json", "env.json", "validation.json", "adapter/adapter_model.safetensors", "loss.png"]:
        assert (run_dir / name).exists(), name
    job = json.loads((run_dir / "job.json").read_text())
    assert job["status"] == "succeeded"
    assert "succeeded" in result.stdout and job["fine_tuned_model"] in result.stdout.replace("\n", "")


def test_multirun_runs_each_job_in_its_own_dir(tmp_path, cache_dir):
    sweep = tmp_path / "sweep"
    result = ftlab("train", "-m", *TINY, "train.learning_rate_multiplier=0.5,2", "train.max_steps=2",
                   f"hydra.sweep.dir={sweep}", cwd=tmp_path, cache=cache_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    jobs = [json.loads((sweep / str(n) / "job.json").read_text()) for n in (0, 1)]
    assert [j["hyperparameters"]["learning_rate_multiplier"] for j in jobs] == [0.5, 2.0]
    assert all(j["status"] == "succeeded" for j in jobs) and jobs[0]["id"] != jobs[1]["id"]


def test_python_m_trainer_is_ftlab_train(tmp_path, cache_dir):
    run_dir = tmp_path / "D"
    env = os.environ | {"HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    result = subprocess.run([sys.executable, "-m", "trainer", *TINY, "train.max_steps=1", f"hydra.run.dir={run_dir}",
                             f"cache_dir={cache_dir}"], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads((run_dir / "job.json").read_text())["status"] == "succeeded"


@pytest.mark.parametrize("override,expected", [
    ("train.n_epoch=3", "Key 'n_epoch' not in 'TrainConfig'"),
    ("train.quantization=int3", "expected one of [none, nf4, auto]"),
    ("model=gpt-5", "Could not find 'model/gpt-5'"),
])
def test_config_mistakes_name_the_key_and_the_choices(tmp_path, cache_dir, override, expected):
    result = ftlab("train", *TINY, override, f"hydra.run.dir={tmp_path / 'D'}", cwd=tmp_path, cache=cache_dir)
    assert result.returncode != 0
    assert expected in result.stderr + result.stdout
    assert not (tmp_path / "D" / "job.json").exists()


def test_unknown_verb_lists_the_verbs(tmp_path, cache_dir):
    result = ftlab("trian", cwd=tmp_path, cache=cache_dir)
    assert result.returncode == 2 and "unknown verb 'trian'" in result.stderr and "estimate" in result.stderr


def test_missing_backbone_weights_say_how_to_provide_them(tmp_path, cache_dir):
    result = ftlab("train", "backbone=llama-3.1-8b-instruct", "logger=none", "train.max_steps=1",
                   f"hydra.run.dir={tmp_path / 'D'}", cwd=tmp_path, cache=cache_dir)
    assert result.returncode == 1 and "failed [backbone_not_found]" in result.stdout  # the code, not eaten as markup
    job = json.loads((tmp_path / "D" / "job.json").read_text())
    assert job["status"] == "failed" and job["error"]["code"] == "backbone_not_found"
    assert "backbone.load.path" in job["error"]["message"]
    assert "hf download meta-llama/Llama-3.1-8B-Instruct" in job["error"]["message"]


@pytest.mark.parametrize("verb,override,code", [
    ("estimate", "suffix='bad suffix/with:chars and way too long'", "invalid_suffix"),
    ("estimate", "train.batch_size=0", "invalid_hyperparameter"),
    ("estimate", "train.learning_rate_multiplier=-1", "invalid_hyperparameter"),
    ("validate", "train.n_epochs=100", "invalid_hyperparameter"),
])
def test_bad_settings_are_refused_before_anything_loads(tmp_path, cache_dir, verb, override, code):
    run_dir = tmp_path / "run"
    result = ftlab(verb, *TINY, override, f"hydra.run.dir={run_dir}", cwd=tmp_path, cache=cache_dir)
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"[{code}]" in result.stderr and override.split("=")[0] in result.stderr
    assert not (run_dir / "estimate.json").exists() and not (run_dir / "validation.json").exists()


@pytest.mark.parametrize("override,code", [("suffix='bad suffix/with:chars and way too long'", "invalid_suffix"),
                                           ("suffix=" + "x" * 65, "invalid_suffix"),
                                           ("train.learning_rate_multiplier=-1", "invalid_hyperparameter")])
def test_a_job_with_bad_settings_fails_before_the_preflight(tmp_path, cache_dir, override, code):
    run_dir = tmp_path / "run"
    result = ftlab("train", *TINY, override, f"hydra.run.dir={run_dir}", cwd=tmp_path, cache=cache_dir)
    assert result.returncode == 1 and f"[{code}]" in result.stdout, result.stdout + result.stderr
    job = json.loads((run_dir / "job.json").read_text())
    assert job["status"] == "failed" and job["error"]["code"] == code and job["fine_tuned_model"] is None
    assert not (run_dir / "estimate.json").exists()  # refused before the pre-flight read the data


def test_a_good_suffix_names_the_model(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    result = ftlab("train", *TINY, "suffix=brand-tone_v2.1", "train.max_steps=1", f"hydra.run.dir={run_dir}",
                   cwd=tmp_path, cache=cache_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    assert ":brand-tone_v2.1:" in json.loads((run_dir / "job.json").read_text())["fine_tuned_model"]


def test_resume_honours_run_length_overrides_and_refuses_the_rest(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    first = ftlab("train", *TINY, "train.max_steps=2", "train.checkpoint_every=1", f"hydra.run.dir={run_dir}",
                  cwd=tmp_path, cache=cache_dir)
    assert first.returncode == 0, first.stdout + first.stderr
    refused = ftlab("train", f"resume={run_dir}", "train.max_steps=4", "train.learning_rate_multiplier=3",
                    cwd=tmp_path, cache=cache_dir)
    assert refused.returncode == 2 and "[resume_override] train.learning_rate_multiplier" in refused.stderr
    assert "train.max_steps" not in refused.stderr.split("These can")[0]  # only the refused key is named
    longer = ftlab("train", f"resume={run_dir}", "train.max_steps=4", cwd=tmp_path, cache=cache_dir)
    assert longer.returncode == 0, longer.stdout + longer.stderr
    rows = (run_dir / "results.csv").read_text().splitlines()[1:]
    assert [int(row.split(",")[0]) for row in rows] == [1, 2, 3, 4]


def test_the_program_ends_quickly_but_keeps_exit_codes_output_and_exit_hooks(tmp_path):
    """`ftlab` collects less garbage and skips the interpreter's teardown (trainer.cli.run), losing nothing."""
    script = ("import atexit, gc, sys\n"
              "import trainer.cli\n"
              "atexit.register(lambda: open(sys.argv[1], 'w').write('hook ran'))\n"
              "trainer.cli.main = lambda: (print('all of the output', end=''), print(gc.get_threshold()[2], file=sys.stderr),\n"
              "                            sys.exit(int(sys.argv[2])))\n"
              "trainer.cli.run()\n")
    for code in (0, 3):
        marker = tmp_path / f"hook-{code}"
        result = subprocess.run([sys.executable, "-c", script, str(marker), str(code)], capture_output=True, text=True,
                                timeout=60)
        assert (result.returncode, result.stdout, marker.read_text()) == (code, "all of the output", "hook ran")
        assert result.stderr.strip() == "1000"  # full collections only every 1,000 young ones while it runs


def test_ftlab_serve_sets_openmp_spinning_before_torch_loads():
    """libgomp reads OMP_WAIT_POLICY once, when torch loads it: `ftlab serve` must set it before anything imports
    torch, or the engine's thread decodes throttled (trainer/openmp.py); its training jobs start without it. The
    server itself is stubbed out."""
    check = """
import os, sys, types
stub = types.ModuleType("trainer.serve.app")
def serve_main(cfg, overrides):
    print("torch" in sys.modules, os.environ.get("OMP_WAIT_POLICY"))
    from trainer.serve.executors import job_environment
    print("OMP_WAIT_POLICY" in job_environment())  # the server's setting, not its training jobs'
    return 0
stub.serve_main = serve_main
sys.modules["trainer.serve.app"] = stub
import trainer.cli
try:
    trainer.cli.main(["serve"])
except SystemExit:
    pass
"""
    env = {key: value for key, value in os.environ.items() if key not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, env=env, timeout=120,
                            cwd=Path(__file__).resolve().parent.parent)
    assert result.stdout.split() == ["False", "ACTIVE", "False"], result.stdout + result.stderr
