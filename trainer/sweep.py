"""Sweeps: the value a sweeper optimises, and a summary of every job once a multirun ends."""
import csv
import io
import json
import math
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from trainer.files import write_atomic

SUMMARY_COLUMNS = ["job_num", "job_id", "overrides", "status", "final_train_loss", "final_valid_loss",
                   "trained_tokens", "training_cost_usd", "wall_seconds", "error", "run_dir"]


def read_results(run_dir: Path) -> list[dict]:
    """results.csv rows of a run dir (empty when the job never trained a step)."""
    try:
        with open(run_dir / "results.csv", encoding="utf-8") as handle:
            return list(csv.DictReader(handle))
    except OSError:
        return []


def objective(run_dir: Path) -> float:
    """What a sweeper minimises: the last validation loss, else the last training loss; NaN for a failed job."""
    try:
        if json.loads((run_dir / "job.json").read_text())["status"] != "succeeded":
            return math.nan
    except (OSError, ValueError, KeyError):
        return math.nan
    rows = read_results(run_dir)
    for column in ("valid_loss", "train_loss"):
        values = [float(row[column]) for row in rows if row.get(column)]
        if values:
            return values[-1]
    return math.nan


def summarize_job(run_dir: Path) -> dict:
    """One row of summary.csv for the job in `run_dir`."""
    job = json.loads((run_dir / "job.json").read_text())
    rows = read_results(run_dir)
    overrides_file = run_dir / ".hydra" / "overrides.yaml"
    overrides = OmegaConf.load(overrides_file) if overrides_file.exists() else []
    try:
        cost = json.loads((run_dir / "estimate.json").read_text()).get("training_cost_usd")
    except (OSError, ValueError):
        cost = None
    last = lambda column: next((float(r[column]) for r in reversed(rows) if r.get(column)), None)  # noqa: E731
    finished = job.get("finished_at")
    return {
        "job_num": run_dir.name,
        "job_id": job["id"],
        "overrides": " ".join(o for o in overrides if not o.startswith("hydra.")),
        "status": job["status"],
        "final_train_loss": last("train_loss"),
        "final_valid_loss": last("valid_loss"),
        "trained_tokens": job.get("trained_tokens"),
        "training_cost_usd": cost,
        "wall_seconds": finished - job["created_at"] if finished else None,
        "error": (job.get("error") or {}).get("code"),
        "run_dir": str(run_dir),
    }


def write_summary(sweep_dir: Path) -> list[dict]:
    """Write `summary.csv` and `summary.png` (loss curves of every job) in the sweep dir."""
    run_dirs = sorted((p.parent for p in sweep_dir.glob("*/job.json")), key=lambda p: (len(p.name), p.name))
    summary = [summarize_job(run_dir) for run_dir in run_dirs]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=SUMMARY_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(summary)
    write_atomic(sweep_dir / "summary.csv", buffer.getvalue())
    if summary:
        _plot(summary, sweep_dir / "summary.png")
    return summary


def _plot(summary: list[dict], path: Path) -> None:
    from trainer.plots import plt, save_figure

    figure, (curves, bars) = plt.subplots(1, 2, figsize=(12, 4.5), dpi=110)
    shared = set.intersection(*(set(job["overrides"].split()) for job in summary))
    for job in summary:
        rows = read_results(Path(job["run_dir"]))
        swept = " ".join(o for o in job["overrides"].split() if o not in shared) or "(shared settings)"
        label = f"{job['job_num']}: {swept}"[:70] + ("" if job["status"] == "succeeded" else f" [{job['status']}]")
        if rows:
            curves.plot([int(r["step"]) for r in rows], [float(r["train_loss"]) for r in rows], label=label)
    curves.set(xlabel="step", ylabel="training loss", title="training loss per job")
    curves.grid(alpha=0.3)
    curves.legend(fontsize=7)
    names = [job["job_num"] for job in summary]
    finals = [job["final_valid_loss"] if job["final_valid_loss"] is not None else (job["final_train_loss"] or 0) for job in summary]
    colors = ["#2ca02c" if job["status"] == "succeeded" else "#d62728" for job in summary]
    bars.bar(range(len(names)), finals, color=colors, tick_label=[f"job {name}" for name in names])
    for index, job in enumerate(summary):
        if job["status"] != "succeeded":
            bars.annotate(job["status"], (index, 0), ha="center", va="bottom", color="#d62728")
    bars.set(xlabel="job", ylabel="final validation (else training) loss", title="final loss (red: not succeeded)")
    save_figure(figure, path)


class SweepSummary(Callback):
    """Hydra callback: when a multirun ends, summarise its jobs in the sweep dir."""

    def __init__(self) -> None:
        self.failed: list[str] = []

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            return
        summary = write_summary(sweep_dir)
        self.failed = [job["job_num"] for job in summary if job["status"] != "succeeded"]
        FAILED_JOBS.extend(self.failed)
        print(f"sweep summary: {len(summary)} jobs, {len(self.failed)} not succeeded -> {sweep_dir / 'summary.csv'}")


FAILED_JOBS: list[str] = []  # filled by SweepSummary; the CLI exits 1 when a sweep had a failed job
