"""Experiment trackers, chosen by the `logger` config group (`_target_` nodes)."""
import os
from pathlib import Path


class NullLogger:
    """Logs nothing (`logger=none`)."""

    def __init__(self, run_dir: Path, run_config: dict | None = None, name: str | None = None):
        pass

    def log(self, metrics: dict, step: int) -> None:
        pass

    def finish(self, status: str) -> None:
        pass


class WandbLogger:
    """Weights & Biases in offline mode, everything inside `<run_dir>/wandb` (nothing in ~/.cache).

    Sync later with `wandb sync <run_dir>/wandb/offline-run-*`.
    """

    def __init__(self, run_dir: Path, run_config: dict | None = None, name: str | None = None,
                 project: str = "ftlab", mode: str = "offline", run_name: str | None = None,
                 tags: list | None = None):
        folder = Path(run_dir) / "wandb"
        folder.mkdir(parents=True, exist_ok=True)
        for variable in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR"):
            os.environ[variable] = str(folder)
        os.environ["WANDB_MODE"] = mode
        os.environ.setdefault("WANDB_SILENT", "true")
        import wandb

        self.run = wandb.init(project=project, name=run_name or name, dir=str(run_dir), mode=mode,
                              config=run_config or {}, tags=list(tags or []) or None,
                              settings=wandb.Settings(console="off", x_disable_stats=True))

    def log(self, metrics: dict, step: int) -> None:
        self.run.log(metrics, step=step)

    def finish(self, status: str) -> None:
        self.run.finish(exit_code=0 if status == "succeeded" else 1)
