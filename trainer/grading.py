"""`ftlab grade`: run a grader over a JSONL file of model samples and dataset items.

    ftlab grade grader=grader.json samples=samples.jsonl
    ftlab grade grader=judge.json samples=samples.jsonl jobs_root=~/ftlab-jobs   # model graders judged by ft: models

`grader` is a grader JSON object as the hosted API takes it (`trainer.graders`); each line of
`samples` is `{"sample": "<the model's reply>", "item": {<the dataset line's fields>}}` (`sample`
may also be `{"output_text": …, "output_tools": [...]}`). The table shows each line's reward, its
sub-graders' scores and the error flags raised, then the mean.
"""
import json
from pathlib import Path

from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table

from trainer.graders import GraderError, Settings, grade_many, sample_namespace, sub_graders, validate

BATCH = 16  # samples graded at a time (the progress bar's step; one python sandbox process each)


class GradeInputError(ValueError):
    """A grader or samples file that cannot be used; the message names the file (and line) and the fix."""


def read_grader(path: str, settings: Settings) -> dict:
    """The grader in a JSON file, validated."""
    try:
        grader = json.loads(Path(path).expanduser().read_text(encoding="utf-8"))
    except OSError as error:
        raise GradeInputError(f"grader={path}: cannot read it ({error.strerror})") from None
    except ValueError as error:
        raise GradeInputError(f"grader={path}: not JSON ({error}); write the grader as one JSON object") from None
    try:
        return validate(grader, settings=settings)
    except GraderError as error:
        raise GradeInputError(f"grader={path}: [{error.param}] {error}") from None


def read_samples(path: str) -> list[tuple[int, dict, dict]]:
    """(line number, sample namespace, item) of every line of the samples file."""
    from trainer.data.jsonl import DataFileError, load_examples

    try:
        lines = load_examples(Path(path).expanduser())
    except (DataFileError, OSError) as error:
        raise GradeInputError(f"samples={path}: {error}") from None
    rows = []
    for number, line in lines:
        where = f"{path}:{number}"
        if not isinstance(line, dict) or "sample" not in line:
            raise GradeInputError(f"{where}: each line needs \"sample\" (the model's reply) and \"item\" (an object)")
        sample, item = line["sample"], line.get("item", {})
        if not isinstance(item, dict):
            raise GradeInputError(f"{where}: \"item\" must be an object (the dataset line's fields)")
        if isinstance(sample, str):
            sample = sample_namespace(sample)
        elif isinstance(sample, dict) and isinstance(sample.get("output_text"), str):
            sample = sample_namespace(sample["output_text"], sample.get("output_tools"))
        else:
            raise GradeInputError(f"{where}: \"sample\" must be the reply's text, or {{\"output_text\": …}}")
        rows.append((number, sample, item))
    if not rows:
        raise GradeInputError(f"samples={path}: no lines to grade")
    return rows


def grade_main(cfg: DictConfig) -> int:
    """`ftlab grade`: grade every line, print the table; exit 2 for a grader or file that cannot be used."""
    from rich.progress import Progress

    console = Console(soft_wrap=True)
    settings = Settings.from_config(cfg.graders)
    try:
        if not cfg.get("grader") or not cfg.get("samples"):
            raise GradeInputError("say what to grade: ftlab grade grader=<grader.json> samples=<samples.jsonl>")
        grader = read_grader(str(cfg.grader), settings)
        rows = read_samples(str(cfg.samples))
    except GradeInputError as error:
        Console(stderr=True, soft_wrap=True).print(f"[red]error[/] {error}", highlight=False)
        return 2
    judge = _judge(cfg, grader)
    grades = []
    with Progress(console=console, transient=True) as progress:
        bar = progress.add_task("grading", total=len(rows))
        for start in range(0, len(rows), BATCH):
            chunk = rows[start:start + BATCH]
            grades += grade_many(grader, [(sample, item) for _, sample, item in chunk], settings, judge)
            progress.advance(bar, len(chunk))
    print_grades(grader, rows, grades, console)
    return 0


def _judge(cfg: DictConfig, grader: dict):
    """The models that judge model graders: the configured backbone and the jobs under jobs_root."""
    kinds = {grader["type"]} | {sub["type"] for sub in sub_graders(grader).values()}
    if not kinds & {"score_model", "label_model"}:
        return None
    from trainer.jobs import jobs_root
    from trainer.serve.pool import ModelPool

    return ModelPool(cfg, jobs_root(cfg.get("jobs_root"))).judge


def print_grades(grader: dict, rows: list, grades: list, console: Console) -> None:
    """One row per line: reward, sub-graders' scores, error flags; then the mean reward."""
    table = Table(title=f"{grader['name']} ({grader['type']})")
    for column in ("line", "reward", "sub-graders", "errors"):
        table.add_column(column, justify="right" if column in ("line", "reward") else "left")
    for (number, _, _), result in zip(rows, grades):
        subs = ", ".join(f"{name} {score:.3g}" for name, score in result.sub_rewards.items())
        errors = ", ".join(flag for flag, value in result.errors.items() if value is True)
        table.add_row(str(number), f"{result.reward:.4g}", subs, errors)
    console.print(table)
    failed = sum(any(value is True for value in result.errors.values()) for result in grades)
    mean = sum(result.reward for result in grades) / len(grades)
    console.print(f"mean reward {mean:.4f} over {len(grades)} samples; {failed} with errors", highlight=False)
