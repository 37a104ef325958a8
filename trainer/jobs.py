"""The job store: run directories under `outputs/` (each with a `job.json`) are the jobs.

    ftlab jobs list [limit=20] [after=ftjob-…] [--json]     # newest first, as the hosted API pages
    ftlab jobs show ftjob-…|ft:…|<run dir> [--json]
    ftlab jobs events <job> [limit=20] [after=ftevent-…] [--json]
    ftlab jobs checkpoints <job> [--json]
    ftlab jobs cancel <job>                                  # stop a running job cleanly

A job reference is a job id (`ftjob-…`), a fine-tuned model name (`ft:<model>:<org>:<suffix>:<id>`,
or a checkpoint's `…:ckpt-step-N`), a run directory, or `latest` (the newest succeeded job).
The store's root is `root=` / `--root`, else `$FTLAB_OUTPUTS`, else `./outputs`.
`load_job_config` turns a run dir's `.hydra/config.yaml` back into a typed config for
chat, eval and export.
"""
import csv
import json
import os
import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Optional

DEFAULT_LIMIT = 20
# Keys the using command decides, not the job: what to run and how to sample.
COMMAND_KEYS = ("job", "jobs_root", "adapter", "prompt", "system", "generation", "eval", "export")


class JobNotFound(LookupError):
    """A job reference that matches no job (or more than one); the message says how to find the right one."""


@dataclass
class JobRef:
    """A job found in the store: its record, its run dir and the adapter to load."""

    record: dict
    run_dir: Path
    adapter_dir: Path  # `adapter/`, or a checkpoint's adapter for a `…:ckpt-step-N` name
    checkpoint_step: Optional[int] = None

    @property
    def id(self) -> str:
        return self.record["id"]

    @property
    def name(self) -> str:
        """The model name to show: the fine-tuned model (or checkpoint), else the job id."""
        base = self.record.get("fine_tuned_model") or self.id
        return f"{base}:ckpt-step-{self.checkpoint_step}" if self.checkpoint_step is not None else base


def jobs_root(root: Optional[str] = None) -> Path:
    """The folder scanned for jobs: `root`, else `$FTLAB_OUTPUTS`, else `./outputs`."""
    return Path(root or os.environ.get("FTLAB_OUTPUTS") or "outputs").expanduser()


def _read_job(run_dir: Path) -> Optional[dict]:
    try:
        record = json.loads((run_dir / "job.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return record if isinstance(record, dict) and str(record.get("id", "")).startswith("ftjob-") else None


def scan_jobs(root: Optional[str] = None) -> list[JobRef]:
    """Every job under the root, newest first (by `created_at`, then id)."""
    folder = jobs_root(root)
    found = []
    if folder.is_dir():
        for path in folder.rglob("job.json"):
            if any(part.startswith(".") for part in path.relative_to(folder).parts[:-1]):
                continue  # staging folders
            record = _read_job(path.parent)
            if record is not None:
                found.append(JobRef(record, path.parent, path.parent / "adapter"))
    found.sort(key=lambda job: (job.record.get("created_at") or 0, job.id), reverse=True)
    return found


def _unique(matches: list[JobRef], reference: str) -> JobRef:
    if len(matches) > 1:
        dirs = "\n  ".join(str(job.run_dir) for job in matches)
        raise JobNotFound(f"job={reference} matches {len(matches)} run dirs (a copied run dir?):\n  {dirs}\n"
                          "pass the run dir itself as job=<run dir>, or remove the copy")
    return matches[0]


def resolve_job(reference: str, root: Optional[str] = None, *, paths: bool = True) -> JobRef:
    """The job a reference names: a run dir, `ftjob-…`, `ft:…` (optionally `:ckpt-step-N`) or `latest`.

    `paths=False` (the server, whose clients must never name a place on disk) takes names and ids only.
    """
    reference = str(reference).strip()
    path = Path(reference).expanduser()
    if paths and path.is_dir() and (path / "job.json").is_file():
        record = _read_job(path)
        if record is None:
            raise JobNotFound(f"{path / 'job.json'} is not a fine-tuning job record")
        return JobRef(record, path, path / "adapter")
    jobs = scan_jobs(root)
    where = f"in {jobs_root(root)} (set jobs_root=<folder> or FTLAB_OUTPUTS to look elsewhere)"
    if reference == "latest":
        done = [job for job in jobs if job.record.get("status") == "succeeded"]
        if not done:
            raise JobNotFound(f"job=latest: no succeeded job {where}; run `ftlab train` first")
        return done[0]
    checkpoint_step = None
    name = reference
    if reference.startswith("ft:") and ":ckpt-step-" in reference:
        name, _, step = reference.rpartition(":ckpt-step-")
        if not step.isdigit():
            raise JobNotFound(f"job={reference}: a checkpoint name ends with :ckpt-step-<number>")
        checkpoint_step = int(step)
    if name.startswith("ftjob-"):
        matches = [job for job in jobs if job.id == name]
    elif name.startswith("ft:"):
        matches = [job for job in jobs if job.record.get("fine_tuned_model") == name]
    else:
        raise JobNotFound(f"job={reference}: not a run dir with a job.json, a job id (ftjob-…), "
                          "an ft: model name, `latest` or `base`")
    if not matches:
        raise JobNotFound(f"job={reference}: no such job {where}; `ftlab jobs list` shows the jobs there")
    job = _unique(matches, reference)
    if checkpoint_step is not None:
        from trainer.checkpoints import checkpoint_path, is_epoch_checkpoint

        folder = checkpoint_path(job.run_dir / "checkpoints", checkpoint_step)
        adapter = folder / "adapter"
        if not adapter.is_dir() or not is_epoch_checkpoint(folder):  # only the published (epoch) checkpoints
            kept = ", ".join(c["fine_tuned_model_checkpoint"] for c in list_checkpoints(job)) or "none"
            raise JobNotFound(f"job={reference}: checkpoint not kept; kept checkpoints: {kept}")
        job = JobRef(job.record, job.run_dir, adapter, checkpoint_step)
    return job


def require_adapter(job: JobRef) -> JobRef:
    """The job, if its adapter is there to load; else a message saying what state the job is in."""
    if not (job.adapter_dir / "adapter_config.json").is_file():
        status = job.record.get("status")
        error = job.record.get("error") or {}
        detail = f": [{error.get('code')}] {error.get('message')}" if error else ""
        hint = " — use one of its checkpoints (`ftlab jobs checkpoints`)" if list_checkpoints(job) else ""
        raise JobNotFound(f"job {job.id} has no adapter at {job.adapter_dir} (status {status}{detail}){hint}")
    return job


def upgrade_recorded_config(recorded):
    """A job config recorded before LoRA, the optimizer and the schedule had their own groups, in today's shape
    (`train.lora` → `lora`, `train.weight_decay` → `optim`, `train.warmup_ratio` → `scheduler`)."""
    train = recorded.get("train") or {}
    if "lora" in train:
        recorded.lora = train.pop("lora")
    if "weight_decay" in train:
        recorded.optim = {"_target_": "torch.optim.AdamW", "_partial_": True, "weight_decay": train.pop("weight_decay")}
    if "warmup_ratio" in train:
        recorded.scheduler = {"_target_": "trainer.train.warmup_schedule", "_partial_": True, "name": "linear",
                              "warmup_ratio": train.pop("warmup_ratio")}
    return recorded


def load_job_config(job: JobRef, command_cfg=None, overrides: tuple[str, ...] = ()):
    """The job's composed config, typed again (enums are enums), with the command's own settings on top.

    The command keeps `COMMAND_KEYS` (generation, eval, prompt, …); any dotted key overridden on
    its command line (`data.validation_file=…`, `train.device=cpu`) takes the command's value.
    """
    from omegaconf import OmegaConf

    from trainer.schema import FtlabConfig

    path = job.run_dir / ".hydra" / "config.yaml"
    if not path.is_file():
        raise JobNotFound(f"{path}: the job's composed config is missing, so its backbone and chat template "
                          "cannot be known; was this run dir made by `ftlab train`?")
    cfg = OmegaConf.merge(OmegaConf.structured(FtlabConfig), upgrade_recorded_config(OmegaConf.load(path)))
    if cfg.get("request"):  # a job ftlab serve created: its request record, from wherever the run dir is now
        from trainer.compose import literal
        from trainer.request import REQUEST_FILE, with_request

        cfg.request = literal(str(job.run_dir / REQUEST_FILE))
        cfg = with_request(cfg)
    if command_cfg is not None:
        for key in COMMAND_KEYS:
            if key in command_cfg:
                cfg[key] = command_cfg[key]
    for override in overrides if command_cfg is not None else ():
        key = override.split("=", 1)[0]
        if "=" in override and "." in key and not key.startswith(("hydra.", "+", "~")) \
                and key.split(".")[0] not in COMMAND_KEYS:
            OmegaConf.update(cfg, key, OmegaConf.select(command_cfg, key), merge=False)
    return cfg


# ---- the hosted API's list shapes -----------------------------------------------------------
def page(items: list[dict], limit: int = DEFAULT_LIMIT, after: Optional[str] = None) -> dict:
    """`{object: list, data, has_more}`: up to `limit` items following the one whose id is `after`."""
    if limit < 1:
        raise ValueError(f"limit={limit}: must be at least 1")
    start = 0
    if after:
        ids = [item["id"] for item in items]
        if after not in ids:
            raise JobNotFound(f"after={after}: no such id in this list")
        start = ids.index(after) + 1
    data = items[start : start + limit]
    return {"object": "list", "data": data, "has_more": start + limit < len(items)}


def list_jobs(root: Optional[str] = None, limit: int = DEFAULT_LIMIT, after: Optional[str] = None) -> dict:
    """GET /fine_tuning/jobs: newest first, paginated by `after` (a job id) and `limit`."""
    return page([job.record | {"run_dir": str(job.run_dir)} for job in scan_jobs(root)], limit, after)


def list_events(job: JobRef, limit: int = DEFAULT_LIMIT, after: Optional[str] = None) -> dict:
    """GET /fine_tuning/jobs/{id}/events: newest first; event ids are `ftevent-<job>-<line>`."""
    events = []
    path = job.run_dir / "events.jsonl"
    if path.is_file():
        for line_number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill mid-write
            events.append({"id": f"ftevent-{job.id.removeprefix('ftjob-')[:8]}-{line_number:05d}"} | event)
    return page(events[::-1], limit, after)


def list_checkpoints(job: JobRef) -> list[dict]:
    """GET /fine_tuning/jobs/{id}/checkpoints: the kept epoch checkpoints (those of the last three epochs), newest
    first, with metrics; a job's resume checkpoints are not listed."""
    from trainer.checkpoints import published

    metrics = {}
    if (job.run_dir / "results.csv").is_file():
        with open(job.run_dir / "results.csv", newline="") as handle:
            metrics = {int(row["step"]): row for row in csv.DictReader(handle) if row.get("step")}
    checkpoints = []
    for path in published(job.run_dir / "checkpoints"):
        if not (path / "adapter").is_dir() or not path.name[5:].isdigit():
            continue
        step = int(path.name[5:])
        row = metrics.get(step, {})
        checkpoints.append({
            "object": "fine_tuning.job.checkpoint",
            "id": f"ftckpt_{job.id.removeprefix('ftjob-')[:8]}{step:06d}",  # the hosted API's ftckpt_ ids
            "created_at": int(path.stat().st_mtime),
            "fine_tuned_model_checkpoint": f"{job.record.get('fine_tuned_model') or job.id}:ckpt-step-{step}",
            "fine_tuning_job_id": job.id,
            "step_number": step,
            "metrics": {key: float(value) for key, value in row.items() if key != "step" and value not in ("", None)},
            "path": str(path / "adapter"),
        })
    return checkpoints


# ---- `ftlab jobs ...` -------------------------------------------------------------------------
USAGE = """usage: ftlab jobs list [limit=N] [after=ftjob-…] [root=DIR] [--json]
       ftlab jobs show <job> [--json]
       ftlab jobs events <job> [limit=N] [after=ftevent-…] [--json]
       ftlab jobs checkpoints <job> [--json]
       ftlab jobs cancel <job>
<job> is a job id (ftjob-…), an ft: model name, a run dir or `latest`; jobs are looked up
under root=DIR, else $FTLAB_OUTPUTS, else ./outputs."""


def _when(timestamp) -> str:
    return datetime.fromtimestamp(timestamp).strftime("%Y-%m-%d %H:%M:%S") if timestamp else "-"


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows)]
    lines = ["  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip()
             for row in [headers, *rows]]
    return "\n".join(lines)


def _parse(args: list[str]) -> tuple[list[str], dict]:
    positional, options = [], {"json": False}
    iterator = iter(args)
    for arg in iterator:
        if arg == "--json":
            options["json"] = True
        elif arg in ("--root", "--limit", "--after"):
            options[arg[2:]] = next(iterator, None)
        elif arg.startswith("--") and "=" in arg:
            key, value = arg[2:].split("=", 1)
            options[key] = value
        elif "=" in arg:
            key, value = arg.split("=", 1)
            options["root" if key == "jobs_root" else key] = value
        else:
            positional.append(arg)
    unknown = set(options) - {"json", "root", "limit", "after"}
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(sorted(unknown))}; options are limit=, after=, root=, --json")
    if "limit" in options:
        try:
            options["limit"] = int(options["limit"])
        except (TypeError, ValueError):
            raise ValueError(f"limit={options['limit']}: must be a whole number") from None
    return positional, options


def _print_list(listing: dict) -> None:
    rows = [[job["id"], job.get("status", "-"), job.get("fine_tuned_model") or "-", job.get("backbone", "-"),
             str(job.get("trained_tokens") or "-"), _when(job.get("created_at")), job.get("run_dir", "")]
            for job in listing["data"]]
    print(_table(["ID", "STATUS", "FINE-TUNED MODEL", "BACKBONE", "TOKENS", "CREATED", "RUN DIR"], rows)
          if rows else "no jobs")
    if listing["has_more"]:
        print(f"… more: ftlab jobs list after={listing['data'][-1]['id']}")


def _print_show(job: JobRef) -> None:
    record = job.record
    hp = record.get("hyperparameters") or {}
    error = record.get("error")
    fields = [
        ("id", record["id"]), ("status", record.get("status")), ("model", record.get("model")),
        ("backbone", record.get("backbone")), ("fine_tuned_model", record.get("fine_tuned_model")),
        ("hyperparameters", ", ".join(f"{k}={v}" for k, v in hp.items()) or "-"),
        ("trained_tokens", record.get("trained_tokens")), ("backbone_tokens", record.get("backbone_tokens")),
        ("training_file", (record.get("training_file") or {}).get("path")),
        ("validation_file", (record.get("validation_file") or {}).get("path")),
        ("created_at", _when(record.get("created_at"))), ("finished_at", _when(record.get("finished_at"))),
        ("error", f"[{error.get('code')}] {error.get('message')}" if error else None),
        ("run_dir", str(job.run_dir)),
        ("adapter", str(job.adapter_dir) if job.adapter_dir.is_dir() else "-"),
        ("eval", str(job.run_dir / "eval.json") if (job.run_dir / "eval.json").is_file() else "-"),
        ("merged", str(job.run_dir / "merged") if (job.run_dir / "merged").is_dir() else "-"),
    ]
    width = max(len(key) for key, _ in fields)
    print("\n".join(f"{key:<{width}}  {'-' if value is None else value}" for key, value in fields))


def _print_events(listing: dict) -> None:
    rows = [[_when(event.get("created_at")), event.get("level", ""), event.get("message", "")]
            for event in listing["data"]]
    print(_table(["CREATED", "LEVEL", "MESSAGE"], rows) if rows else "no events")
    if listing["has_more"]:
        print(f"… older: add after={listing['data'][-1]['id']}")


def _print_checkpoints(checkpoints: list[dict]) -> None:
    rows = [[c["fine_tuned_model_checkpoint"], str(c["step_number"]),
             " ".join(f"{k}={v:.4g}" for k, v in c["metrics"].items()), c["path"]] for c in checkpoints]
    print(_table(["CHECKPOINT", "STEP", "METRICS", "PATH"], rows) if rows else "no checkpoints kept")


def _cancel(job: JobRef) -> dict:
    """Signal the process training `job` to stop; it checkpoints and records `cancelled` itself."""
    from trainer.run import cancel_job

    pid = cancel_job(job.run_dir)
    if pid is None:
        return {"id": job.id, "status": job.record.get("status"), "cancelled": False,
                "message": f"{job.id} is not running here (status {job.record.get('status')}); nothing to cancel"}
    return {"id": job.id, "status": "cancelling", "cancelled": True, "pid": pid,
            "message": f"cancelling {job.id} (pid {pid}): it writes a checkpoint and marks the job cancelled; "
                       f"resume with: ftlab train resume={job.id}"}


def jobs_main(args: list[str]) -> int:
    """`ftlab jobs <list|show|events|checkpoints|cancel> ...`; returns the exit code."""
    try:
        positional, options = _parse(args)
        action = positional.pop(0) if positional else "list"
        root, as_json = options.get("root"), options["json"]
        if action == "list":
            result = list_jobs(root, options.get("limit", DEFAULT_LIMIT), options.get("after"))
            show = _print_list
        elif action in ("show", "events", "checkpoints", "retrieve"):
            if len(positional) != 1:
                raise ValueError(f"ftlab jobs {action} takes one job (an id, ft: name, run dir or latest)")
            job = resolve_job(positional[0], root)
            if action in ("show", "retrieve"):
                result, show = job.record | {"run_dir": str(job.run_dir)}, lambda _: _print_show(job)
            elif action == "events":
                result, show = list_events(job, options.get("limit", DEFAULT_LIMIT), options.get("after")), _print_events
            else:
                checkpoints = list_checkpoints(job)
                result = {"object": "list", "data": checkpoints, "has_more": False}
                show = lambda _: _print_checkpoints(checkpoints)  # noqa: E731
        elif action == "cancel":
            if len(positional) != 1:
                raise ValueError("ftlab jobs cancel takes one job (an id, ft: name, run dir or latest)")
            job = resolve_job(positional[0], root)
            result, show = _cancel(job), lambda outcome: print(outcome["message"])
        elif action in ("help", "-h", "--help"):
            print(USAGE)
            return 0
        else:
            raise ValueError(f"unknown action '{action}'")
    except (JobNotFound, ValueError) as error:
        usage = f"\n\n{USAGE}" if isinstance(error, ValueError) else ""
        print(f"ftlab jobs: {error}{usage}", file=sys.stderr)
        return 2
    if as_json:
        print(json.dumps(result, indent=2, default=str, ensure_ascii=False))
    else:
        show(result)
    return 0
