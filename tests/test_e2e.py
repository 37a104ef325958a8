"""End-to-end on the real embedded SmolLM2-135M-Instruct: a few steps of the default job."""
import json

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from trainer.compose import CONFIG_DIR
from trainer.schema import register_configs
from trainer.train import run_training

pytestmark = pytest.mark.e2e


def test_default_job_on_the_embedded_backbone_learns(tmp_path):
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=["train.max_steps=4", "train.eval_every=4",
                                                       "train.learning_rate_multiplier=5"])
    run_dir = tmp_path / "run"
    assert run_training(cfg, run_dir) == 0
    job = json.loads((run_dir / "job.json").read_text())
    assert job["status"] == "succeeded" and job["backbone"] == "SmolLM2-135M-Instruct"
    rows = (run_dir / "results.csv").read_text().splitlines()[1:]
    losses = [float(row.split(",")[1]) for row in rows]
    assert len(losses) == 4 and losses[-1] < losses[0]
    assert float(rows[-1].split(",")[3]) > 0  # validation loss measured
    assert list((run_dir / "wandb").glob("offline-run-*")), "wandb offline run not inside the run dir"
    assert (run_dir / "adapter" / "adapter_model.safetensors").stat().st_size > 1_000_000
