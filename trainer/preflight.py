"""Before any model is loaded: validate the data, screen it, and price the job.

`run_validate` writes validation.json, token_lengths.png and moderation.json;
`run_estimate` writes estimate.json; `run_preflight` runs both for `ftlab train` and raises
`PreflightError` when the job must not start (format errors, flagged content with
`moderation.action=fail`, an estimate over `train.max_cost_usd`). `validate_main` and
`estimate_main` are the bodies of `ftlab validate` and `ftlab estimate`.

Exit codes of the verbs: 0 ok, 1 the data has errors, 2 a file or config value that cannot
be used at all (missing, a directory, empty, a bad `train.n_epochs`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from trainer import cost
from trainer.data import tokens
from trainer.data.jsonl import DataFileError, iter_jsonl
from trainer.data.validate import (
    MAX_LISTED_PER_CODE,
    Issue,
    ValidationReport,
    validate_files,
)
from trainer.files import write_json
from trainer.moderation import FileScreen, NoScreen, Screen, flagged_issues, screen_files, screens_anything
from trainer.paths import resolve_data_path

EXIT_OK, EXIT_DATA_ERRORS, EXIT_BAD_INPUT = 0, 1, 2


class PreflightError(Exception):
    """Why a job may not start: a code, a message with the fix, and where (file, line)."""

    def __init__(self, code: str, message: str, file: Optional[str] = None, line: Optional[int] = None):
        self.code, self.message, self.file, self.line = code, message, file, line
        super().__init__(str(self))

    def __str__(self) -> str:
        return f"[{self.code}] {self.message}"


@dataclass
class Preflight:
    """What `ftlab train` needs from the checks: the report, the estimate, the files to read."""

    report: ValidationReport
    estimate: dict
    train_file: Path  # the configured file, or <run_dir>/train.screened.jsonl after moderation drops
    validation_file: Optional[Path] = None  # likewise for the validation file


def data_files(cfg) -> dict:
    """{"train": Path, "validation": Path} from `data.train_file` / `data.validation_file`."""
    files = {"train": resolve_data_path(str(cfg.data.train_file))}
    if cfg.data.get("validation_file"):
        files["validation"] = resolve_data_path(str(cfg.data.validation_file))
    return files


def build_screen(node: Any) -> Screen:
    """The moderation screen from the `moderation` config node (null: no screen)."""
    if node is None:
        return NoScreen()
    if isinstance(node, Screen) or hasattr(node, "screen_texts"):
        return node
    from hydra.utils import instantiate

    return instantiate(node)


def _progress(console: Console) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TimeRemainingColumn(),
                    console=console, transient=True)


def _size(path: Path) -> Optional[int]:
    try:
        return path.stat().st_size if path.is_file() else None
    except OSError:
        return None


# --- validate -------------------------------------------------------------------------------

def run_validate(cfg, run_dir: Path, console: Console, files: Optional[dict] = None) -> ValidationReport:
    """Check the data files and screen them; write validation.json, token_lengths.png and
    moderation.json in `run_dir`; print the findings. Never raises for bad data. `files` as
    `data_files(cfg)` resolved them (resolved here when not given)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    files = files or data_files(cfg)
    encoding = tokens.get_encoding(cfg.model.encoding)
    screen = build_screen(cfg.get("moderation"))
    screening = screens_anything(screen)
    readers = {kind: FileScreen(screen) for kind in files} if screening else {}
    with _progress(console) as progress:  # one pass over each file: the checks and the content screen
        tasks = {kind: progress.add_task(f"validate {kind}", total=_size(path)) for kind, path in files.items()}
        report = validate_files(files, tokens.file_format(cfg), encoding, cfg.model.context_length,
                                on_bytes=lambda kind, n: progress.update(tasks[kind], completed=n),
                                on_example=(lambda kind, line, example: readers[kind].add(line, example))
                                if screening else None)
    if report.file_error is None:
        report.moderation = screen_files(screen, files, run_dir,
                                         hits={kind: reader.flagged() for kind, reader in readers.items()})
        issues, per_file = [], {}
        for file, line, message in flagged_issues(report.moderation):
            per_file[file] = per_file.get(file, 0) + 1
            if per_file[file] <= MAX_LISTED_PER_CODE:
                issues.append(Issue(file, line, "moderation_flagged", message))
        issues += [Issue(file, None, "moderation_flagged", f"{n - MAX_LISTED_PER_CODE} more flagged lines not listed; see moderation.json")
                   for file, n in per_file.items() if n > MAX_LISTED_PER_CODE]
        if report.moderation.action == "fail":
            report.extra_errors += issues
        else:
            report.extra_warnings += issues
    write_json(run_dir / "validation.json", report.to_json())
    plot_token_lengths(report, run_dir / "token_lengths.png")
    print_report(report, console)
    return report


def plot_token_lengths(report: ValidationReport, path: Path) -> Optional[Path]:
    """Histogram of tokens per example (train and validation) with the context length marked."""
    series = {f.kind: list(f.token_counts) for f in report.files if len(f.token_counts)}
    if not series:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    context_length = report.files[0].context_length
    fig, ax = plt.subplots(figsize=(7, 4))
    for kind, counts in series.items():
        ax.hist(counts, bins=min(50, max(5, len(counts) // 2)), alpha=0.6, label=f"{kind} ({len(counts)})")
    if max(max(c) for c in series.values()) > context_length * 0.8:
        ax.axvline(context_length, color="red", linestyle="--", label=f"context {context_length}")
    ax.set_xlabel("tokens per example (cl100k_base, as billed)")
    ax.set_ylabel("examples")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return path


def _grouped(issues: list) -> list:
    groups: dict = {}
    for issue in issues:
        groups.setdefault((issue.file, issue.code), []).append(issue)
    return list(groups.values())


def print_report(report: ValidationReport, console: Console) -> None:
    """The findings as tables: issues grouped by file and code, then the statistics."""
    for title, issues, style in (("Errors", report.errors, "red"), ("Warnings", report.warnings, "yellow")):
        if not issues:
            continue
        table = Table(title=title, title_style=style, title_justify="left", show_lines=False)
        for column in ("file", "lines", "code", "count", "message (first)"):
            table.add_column(column, overflow="fold")
        for group in _grouped(issues):
            lines = [str(i.line) for i in group if i.line is not None]
            shown = ", ".join(lines[:5]) + (", …" if len(lines) > 5 else "")
            table.add_row(*(Text(v) for v in (Path(group[0].file).name, shown or "-", group[0].code, str(len(group)),
                                               group[0].message)))
        console.print(table)
    stats = Table(title="Statistics (tokens: cl100k_base, as billed)", title_justify="left")
    for column in ("file", "metric", "min", "max", "mean", "median", "p10", "p90"):
        stats.add_column(column, justify="left" if column in ("file", "metric") else "right")
    for f in report.files:
        if f.file_error is not None:
            continue
        s = f.stats()
        for key in ("messages_per_example", "total_tokens_per_example", "assistant_tokens_per_example",
                    "completion_tokens_per_example", "prompt_tokens_per_example", "preferred_tokens_per_example",
                    "non_preferred_tokens_per_example"):
            d = s.get(key)
            if d:
                stats.add_row(f.kind, key, *(f"{d[k]:.0f}" if k in ("min", "max") else f"{d[k]:.1f}"
                                            for k in ("min", "max", "mean", "median", "p10", "p90")))
        extra = f"{s['n_examples']} valid examples of {s['n_lines']} lines; {s['n_too_long']} over {f.context_length} tokens"
        stats.add_row(f.kind, extra, *[""] * 6)
    if stats.row_count:
        console.print(stats)
    if report.moderation is not None and report.moderation.action != "off":
        m = report.moderation
        by_category = ", ".join(f"{c}: {n}" for c, n in sorted(m.by_category.items())) or "nothing flagged"
        console.print(Text(f"moderation ({m.screen}, action={m.action}): {len(m.flagged)} flagged — {by_category}"))
        if m.dropped_file:
            console.print(f"  dropped examples written to {escape(str(m.dropped_file))}")
    verdict = "[green]ok[/green]" if report.ok else f"[red]{len(report.errors)} error(s)[/red]"
    console.print(f"validation: {verdict}, {len(report.warnings)} warning(s)")


# --- estimate -------------------------------------------------------------------------------

def count_file_tokens(path: Path, cfg, console: Console, *, skip_lines: frozenset = frozenset(),
                      functions: Optional[list] = None) -> tuple[list, int]:
    """(token counts, number of unparseable lines) for a file, with a progress bar. `functions`, when
    given, is appended one bool per counted example: whether it uses function calling."""
    from trainer.data.tools import uses_functions

    encoding = tokens.get_encoding(cfg.model.encoding)
    fmt = tokens.file_format(cfg)
    counts, n_bad = [], 0
    with _progress(console) as progress:
        task = progress.add_task(f"count {Path(path).name}", total=_size(Path(path)))
        for line, example, error in iter_jsonl(path, on_bytes=lambda n: progress.update(task, completed=n)):
            if error is not None:
                n_bad += 1
            elif line not in skip_lines:
                counts.append(tokens.count_example_tokens(example, fmt, encoding))
                if functions is not None:
                    functions.append(uses_functions(example))
    return counts, n_bad


def run_estimate(cfg, run_dir: Path, console: Console, report: Optional[ValidationReport] = None,
                 files: Optional[dict] = None) -> dict:
    """Price the job; write estimate.json in `run_dir` and print it.

    Reuses the token counts of `report` when given (after moderation drops); otherwise
    streams the files. Raises DataFileError for an unusable file and ValueError for a bad
    `train.n_epochs`.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    files = files or data_files(cfg)
    dropped = {}
    if report is not None and report.moderation is not None and report.moderation.action == "drop":
        for f in report.moderation.flagged:
            dropped.setdefault(f["kind"], set()).add(f["line"])
    counts, n_bad, n_with_functions = {}, 0, 0
    for kind, path in files.items():
        file_report = report.file(kind) if report is not None else None
        if file_report is not None and file_report.file_error is None:
            skip = dropped.get(kind, set())
            counts[kind] = [t for line, t in zip(file_report.token_lines, file_report.token_counts) if line not in skip]
            with_functions = file_report.n_with_functions
        else:
            flags: list = []
            counts[kind], bad = count_file_tokens(path, cfg, console, skip_lines=frozenset(dropped.get(kind, ())),
                                                  functions=flags)
            n_bad += bad
            with_functions = sum(flags)
        if kind == "train":
            n_with_functions = with_functions
    estimate = cost.estimate_from_token_counts(cfg, counts["train"], validation_token_counts=counts.get("validation"))
    estimate["training_file"] = str(files["train"])
    if n_bad:
        estimate["n_unparseable_lines"] = n_bad
    if tokens.file_format(cfg).value == "preference":  # OpenAI has not published how it counts a pair
        estimate["pair_tokens"] = "approximate: each pair's input once plus both outputs, billed as training tokens"
    if n_with_functions:  # OpenAI has not published how it counts functions: the cookbook's approximation
        estimate["n_examples_with_functions"] = n_with_functions
        estimate["function_tokens"] = "approximate (OpenAI cookbook, num_tokens_for_tools)"
    budget = cfg.train.get("max_cost_usd")
    estimate["max_cost_usd"] = budget
    estimate["over_budget"] = budget is not None and (estimate["training_cost_usd"] or 0) > float(budget)
    write_json(run_dir / "estimate.json", estimate)
    print_estimate(estimate, console)
    return estimate


def _duration(seconds: Optional[float]) -> str:
    if seconds is None:
        return "unknown"
    hours, rest = divmod(int(round(seconds)), 3600)
    return f"{hours}h {rest // 60:02d}m" if hours else f"{rest // 60}m {rest % 60:02d}s"


def print_estimate(estimate: dict, console: Console) -> None:
    """The estimate as a table: hosted price, then the local run."""
    table = Table(title=f"Estimate: {estimate['model']} ({estimate['pricing']} prices)", title_justify="left")
    table.add_column("")
    table.add_column("value", justify="right")
    rows = [
        ("training examples", f"{estimate['n_examples']:,}"),
        (f"over {estimate['context_length']} tokens (truncated)", f"{estimate['n_too_long']:,}"),
        ("billed tokens per epoch", f"{estimate['billed_tokens_per_epoch']:,}"),
        ("epochs", str(estimate["n_epochs"])),
        ("billed tokens", f"{estimate['billed_tokens']:,}"),
        (f"hosted training cost (${estimate['training_price_per_hour']:g}/hour × local time*)"
         if estimate.get("training_price_per_hour") else f"hosted training cost (${estimate['training_price_per_1k']}/1K)",
         "-" if estimate["training_cost_usd"] is None else f"${estimate['training_cost_usd']:.4f}"),
        ("fine-tuned usage, input / output per 1K", f"${estimate['fine_tuned_input_per_1k']} / ${estimate['fine_tuned_output_per_1k']}"),
    ]
    if "validation_tokens" in estimate:
        rows.append(("validation tokens (not billed)", f"{estimate['validation_tokens']:,}"))
    if estimate.get("n_examples_with_functions"):
        rows.append(("examples using functions (tokens approximate*)",
                     f"{estimate['n_examples_with_functions']:,}"))
    local = estimate.get("local") or {}
    if local.get("tokens_per_second"):
        rows += [
            (f"local throughput ({local['device']}, {local['throughput_source'].split(':')[0]})",
             f"{local['tokens_per_second']:,.0f} tokens/s"),
            ("local wall time", _duration(local["wall_time_s"])),
            (f"local cost (${local['hour_usd']}/h)", f"${local['cost_usd']:.4f}"),
        ]
    for label, value in rows:
        table.add_row(Text(label), Text(value))
    console.print(table)
    if estimate.get("samples"):
        console.print(f"reinforcement: {estimate['samples']:,} sampled replies ({estimate['samples_per_prompt']} per "
                      f"prompt, up to {estimate['max_reply_tokens']} tokens each); local time approximate",
                      highlight=False)
    if estimate.get("training_cost_basis"):
        console.print(f"* {estimate['training_cost_basis']}", highlight=False)
    if estimate.get("pair_tokens"):
        console.print(f"preference pairs: {estimate['pair_tokens']}", highlight=False)
    if estimate.get("n_examples_with_functions"):
        console.print("* function definitions and calls are counted with the OpenAI cookbook's approximation "
                      "(num_tokens_for_tools); OpenAI has not published its formula, so billed tokens and cost "
                      "are approximate for those examples", highlight=False)
    if estimate.get("n_unparseable_lines"):
        console.print(f"[yellow]{estimate['n_unparseable_lines']} line(s) could not be parsed and are not counted — run `ftlab validate`[/yellow]")
    if estimate.get("over_budget"):
        console.print(f"[red]over budget: ${estimate['training_cost_usd']:.4f} > train.max_cost_usd=${estimate['max_cost_usd']}[/red]")


# --- train ----------------------------------------------------------------------------------

def run_preflight(cfg, run_dir: Path, console: Console, files: Optional[dict] = None) -> Preflight:
    """Validate, screen and estimate `files` (default: `data_files(cfg)`) in `run_dir`; raise
    PreflightError if the job may not start."""
    files = files or data_files(cfg)
    report = run_validate(cfg, run_dir, console, files)
    if report.errors:
        first = report.errors[0]
        n = len(report.errors)
        more = f" (and {n - 1} more error(s); see {Path(run_dir) / 'validation.json'})" if n > 1 else ""
        where = f"{first.file}:{first.line}" if first.line is not None else first.file
        raise PreflightError(first.code, f"{where}: {first.message}{more}", first.file, first.line)
    try:
        estimate = run_estimate(cfg, run_dir, console, report=report, files=files)
    except ValueError as err:  # a bad train.n_epochs or a missing price row
        raise PreflightError("invalid_config", str(err)) from err
    if estimate["over_budget"]:
        raise PreflightError(
            "over_budget",
            f"estimated training cost ${estimate['training_cost_usd']:.4f} ({estimate['billed_tokens']:,} billed tokens) "
            f"is over train.max_cost_usd=${estimate['max_cost_usd']} — raise the budget, set train.n_epochs lower, "
            f"or train on fewer/shorter examples",
        )
    screened = report.moderation.screened_files if report.moderation is not None else {}
    return Preflight(report, estimate, Path(screened.get("train", files["train"])),
                     Path(screened.get("validation", files["validation"])) if "validation" in files else None)


# --- verbs ----------------------------------------------------------------------------------

def _hydra_run_dir() -> Path:
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir)


def validate(cfg, run_dir: Path, console: Console) -> int:
    """`ftlab validate` without Hydra: the exit code for `run_dir`."""
    try:
        report = run_validate(cfg, run_dir, console)
    except ValueError as err:  # model.encoding not available, a bad moderation config
        console.print(f"[red]error:[/red] {escape(str(err))}")
        return EXIT_BAD_INPUT
    if report.file_error is not None:
        console.print(f"[red]error:[/red] {escape(str(report.file_error))}")
        return EXIT_BAD_INPUT
    return EXIT_OK if report.ok else EXIT_DATA_ERRORS


def estimate(cfg, run_dir: Path, console: Console) -> int:
    """`ftlab estimate` without Hydra: the exit code for `run_dir`."""
    try:
        run_estimate(cfg, run_dir, console)
    except (DataFileError, ValueError) as err:
        console.print(f"[red]error:[/red] {escape(str(err))}")
        return EXIT_BAD_INPUT
    return EXIT_OK


def validate_main(cfg) -> int:
    """Body of `ftlab validate`: 0 ok, 1 errors in the data, 2 an unusable file or config."""
    return validate(cfg, _hydra_run_dir(), Console())


def estimate_main(cfg) -> int:
    """Body of `ftlab estimate`: 0 ok, 2 an unusable file or config."""
    return estimate(cfg, _hydra_run_dir(), Console())
