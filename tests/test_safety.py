"""Secrets never reach the record; nothing is written outside the run dir; remote code is off by default."""
import os
import subprocess
import sys
from pathlib import Path

from omegaconf import OmegaConf

from trainer.compose import CONFIG_DIR

FTLAB = str(Path(sys.executable).with_name("ftlab"))
SECRETS = {"WANDB_API_KEY": "wandb-secret-0451", "HF_TOKEN": "hf_secret_0452", "OPENAI_API_KEY": "sk-secret-0453",
           "MY_SERVICE_TOKEN": "token-secret-0454", "DB_PASSWORD": "password-secret-0455"}


def test_secrets_stay_out_of_the_run_dir_and_nothing_lands_in_home(tmp_path, cache_dir):
    home, work, run_dir = tmp_path / "home", tmp_path / "work", tmp_path / "work" / "run"
    home.mkdir()
    work.mkdir()
    env = os.environ | SECRETS | {"HOME": str(home), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    env.pop("XDG_CACHE_HOME", None)
    result = subprocess.run([FTLAB, "train", "backbone=tiny-llama", "logger=wandb", "train.max_steps=2",
                             f"hydra.run.dir={run_dir}", f"cache_dir={cache_dir}"], cwd=work, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert list((run_dir / "wandb").glob("offline-run-*"))
    for path in run_dir.rglob("*"):
        if path.is_file():
            content = path.read_bytes()
            for name, secret in SECRETS.items():
                assert secret.encode() not in content, f"{name} leaked into {path}"
    for secret in SECRETS.values():
        assert secret not in result.stdout + result.stderr
    assert [p.name for p in work.iterdir()] == ["run"]  # nothing beside the run dir
    # Library caches (matplotlib's font list) are fine; trackers and hubs must not write there.
    leftovers = [p for p in home.rglob("*") if p.is_file() and ".cache/matplotlib" not in str(p)]
    assert leftovers == [], f"written under HOME: {leftovers}"


def test_no_backbone_trusts_remote_code_by_default():
    for path in Path(CONFIG_DIR, "backbone").glob("*.yaml"):
        assert OmegaConf.load(path).get("trust_remote_code", False) is False, path.name
