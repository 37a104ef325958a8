"""Plots people would rather look at than read."""
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_losses(rows: list[dict], path: Path, title: str = "") -> Path:
    """Training loss per step and validation loss where measured, saved as a PNG."""
    figure, axes = plt.subplots(figsize=(7, 4), dpi=110)
    steps = [r["step"] for r in rows]
    axes.plot(steps, [r["train_loss"] for r in rows], label="train loss", color="#1f77b4", alpha=0.8)
    valid = [(r["step"], r["valid_loss"]) for r in rows if r.get("valid_loss") not in ("", None)]
    if valid:
        axes.plot(*zip(*valid), "o-", label="validation loss", color="#d62728")
    axes.set_xlabel("step")
    axes.set_ylabel("loss (per supervised token)")
    axes.set_title(title, fontsize=9)
    axes.grid(alpha=0.3)
    axes.legend()
    return save_figure(figure, path)


def save_figure(figure, path: Path) -> Path:
    """Lay out, save as PNG atomically (temp file + rename) and close a matplotlib figure."""
    figure.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    figure.savefig(tmp)
    plt.close(figure)
    tmp.replace(path)
    return path
