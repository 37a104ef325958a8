"""What the dashboard knows about an uploaded file before a job exists: its validation report, its
token-length histogram and the price of a job on it, made by the library's own `run_validate` and
`cost.estimate_from_token_counts` with the config a job on that file would have.

Each report is written once per (file, family) to `<jobs_root>/files/<file id>.report/<family>/`
(validation.json, token_lengths.png, report.json); files never change after upload, so it stays valid
until the file is deleted.
"""
import json
import math
import shutil
import threading
from functools import lru_cache
from pathlib import Path
from typing import Optional

from trainer.compose import CONFIG_DIR
from trainer.files import write_json

# one report made at a time: run_validate draws its histogram with pyplot, which is not thread-safe
_making = threading.Lock()


@lru_cache(maxsize=None)
def family_format(family: str) -> str:
    """`chat` or `prompt_completion`: the data format of a hosted family (conf/model/<family>.yaml)."""
    from omegaconf import OmegaConf

    return str(OmegaConf.load(Path(CONFIG_DIR) / "model" / f"{family}.yaml").format)


def guess_family(path: Path) -> str:
    """The family a file's first example fits: prompt/completion → babbage-002, anything else → gpt-3.5-turbo."""
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            for _, line in zip(range(50), handle):
                if line.strip():
                    example = json.loads(line)
                    if isinstance(example, dict) and ("prompt" in example or "completion" in example):
                        return "babbage-002"
                    break
    except (OSError, ValueError):
        pass
    return "gpt-3.5-turbo"


def guess_method(path: Path) -> str:
    """The method a file's first line fits: a preference pair → dpo; messages ending with the user's turn → reinforcement;
    anything else → supervised."""
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            for _, line in zip(range(50), handle):
                if line.strip():
                    example = json.loads(line)
                    if isinstance(example, dict) and "preferred_output" in example:
                        return "dpo"
                    messages = example.get("messages") if isinstance(example, dict) else None
                    if isinstance(messages, list) and messages and isinstance(messages[-1], dict) \
                            and messages[-1].get("role") == "user":
                        return "reinforcement"
                    break
    except (OSError, ValueError):
        pass
    return "supervised"


def file_config(server, family: str, train_path: Path, validation_path: Optional[Path] = None,
                n_epochs: str = "auto", method: str = "supervised"):
    """The config of a job on these files, made as a job's is: the server's overrides for `family` and `method`
    (one of jobs_api.METHODS), then the files and epochs as a request record's data."""
    from trainer.request import JobRequest, job_config
    from trainer.serve.jobs_api import METHODS, base_overrides

    assert method in METHODS
    request = JobRequest(training_file=str(train_path), validation_file=str(validation_path) if validation_path else None,
                         hyperparameters={"n_epochs": "auto" if n_epochs == "auto" else int(n_epochs)}, method=method)
    return job_config([*base_overrides(server, family), f"method={method}"], request)


def report_dir(server, file_id: str) -> Path:
    return server.root / "files" / f"{file_id}.report"


def _folder(server, file_id: str, family: str, method: str) -> Path:
    return report_dir(server, file_id) / (family if method == "supervised" else f"{family}.{method}")


def file_report(server, row: dict, family: str, method: str = "supervised") -> dict:
    """The file's validation as a `family` training file of `method`: validation.json's content, the token counts of
    its usable examples (after any moderation drops) and its context length. Made once, then read back."""
    from rich.console import Console

    from trainer.preflight import run_validate

    folder = _folder(server, row["id"], family, method)
    cached = folder / "report.json"
    made = _read(cached)
    if made is not None:
        return made
    with _making:
        made = _read(cached)  # another request may have made it meanwhile
        if made is not None:
            return made
        path = Path(row["path"])
        cfg = file_config(server, family, path, method=method)
        report = run_validate(cfg, folder, Console(quiet=True), {"train": path})
        train = report.file("train")
        dropped = set()
        if report.moderation is not None and report.moderation.action == "drop":
            dropped = {flag["line"] for flag in report.moderation.flagged}
        counts = [t for line, t in zip(train.token_lines, train.token_counts) if line not in dropped]
        result = {"file_id": row["id"], "family": family, "method": method,
                  "format": family_format(family) if method == "supervised" else str(cfg.method.data_format.value),
                  "context_length": int(cfg.model.context_length),
                  "validation": public_validation(report.to_json(), {str(path): row["filename"]}),
                  "token_counts": counts}
        write_json(cached, result)
        return result


def _read(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def cached_report(server, file_id: str) -> Optional[dict]:
    """A report already made for the file (any family), or None."""
    for path in sorted(report_dir(server, file_id).glob("*/report.json")):
        report = _read(path)
        if report is not None:
            return report
    return None


def forget_deleted(server) -> None:
    """Remove the reports of files that are no longer uploaded."""
    for folder in (server.root / "files").glob("*.report"):
        if server.index.file(folder.name.removesuffix(".report")) is None:
            shutil.rmtree(folder, ignore_errors=True)


def public_validation(validation: Optional[dict], names: dict) -> Optional[dict]:
    """validation.json as clients see it: each server path replaced by the file's name."""
    if validation is None:
        return None

    def rename(value):
        if isinstance(value, dict):
            return {key: (names.get(item, Path(item).name) if key == "file" and isinstance(item, str)
                          else rename(item)) for key, item in value.items()}
        if isinstance(value, list):
            return [rename(item) for item in value]
        return value

    return rename(validation)


def summary(report: dict) -> dict:
    """What the files list shows: the verdict and counts of a report."""
    validation = report["validation"]
    state = "errors" if validation["errors"] else "warnings" if validation["warnings"] else "ok"
    stats = validation["stats"].get("train", {})
    return {"state": state, "family": report["family"], "n_errors": len(validation["errors"]),
            "n_warnings": len(validation["warnings"]), "n_examples": stats.get("n_examples"),
            "n_lines": stats.get("n_lines")}


def histogram(series: dict, context_length: int, max_bins: int = 40) -> dict:
    """Token counts per example binned on shared edges: {edges, counts: {kind: [...]}, context_length}."""
    values = [v for counts in series.values() for v in counts]
    if not values:
        return {"edges": [], "counts": {kind: [] for kind in series}, "context_length": context_length}
    low, high = min(values), max(values)
    bins = max(1, min(max_bins, high - low + 1, max(5, len(values) // 2)))
    width = max(1, math.ceil((high - low + 1) / bins))
    bins = math.ceil((high - low + 1) / width)
    counts = {kind: [0] * bins for kind in series}
    for kind, values_of_kind in series.items():
        for value in values_of_kind:
            counts[kind][min(bins - 1, (value - low) // width)] += 1
    return {"edges": [low + i * width for i in range(bins + 1)], "counts": counts, "context_length": context_length}


def estimate(server, train_row: dict, family: str, n_epochs: str = "auto",
             validation_row: Optional[dict] = None, method: str = "supervised") -> dict:
    """estimate.json for a job on these files (billed tokens, hosted price, local time and cost), from the
    files' token counts; written beside the training file's report."""
    from trainer import cost

    train = file_report(server, train_row, family, method)
    valid = file_report(server, validation_row, family, method) if validation_row else None
    cfg = file_config(server, family, Path(train_row["path"]),
                      Path(validation_row["path"]) if validation_row else None, n_epochs, method)
    result = cost.estimate_from_token_counts(cfg, train["token_counts"],
                                             validation_token_counts=valid["token_counts"] if valid else None)
    budget = cfg.train.get("max_cost_usd")
    result |= {"training_file": train_row["id"], "validation_file": validation_row["id"] if validation_row else None,
               "max_cost_usd": budget,
               "over_budget": budget is not None and (result["training_cost_usd"] or 0) > float(budget)}
    write_json(_folder(server, train_row["id"], family, method) / "estimate.json", result)
    return result
