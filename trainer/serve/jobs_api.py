"""`/v1/fine_tuning/jobs`: create, list, retrieve, cancel, pause and resume jobs; their events and checkpoints.

A job created here is an ordinary ftlab run directory (`<jobs_root>/jobs/<ftjob-id>/`), trained by
`ftlab train` with the serve command's overrides plus the request's (`model=`, `data.train_file=`,
`train.n_epochs=`, …), so the API and `ftlab jobs …` read one record.
"""
import json
import re
import time
from pathlib import Path
from typing import Literal, Optional, Union

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from trainer.cli import quote_value
from trainer.jobs import DEFAULT_LIMIT, JobNotFound, JobRef, list_checkpoints, list_events, page, resolve_job
from trainer.run import EventLog, Job, new_job_id
from trainer.serve.errors import APIError, not_found
from trainer.serve.models_api import families

router = APIRouter()
Auto = Literal["auto"]
# the request decides these; the serve command's own overrides of them are not passed on
JOB_KEYS = ("model=", "data=", "data.", "suffix=", "train.n_epochs=", "train.batch_size=",
            "train.learning_rate_multiplier=", "train.seed=", "init_adapter=", "logger.project=", "logger.run_name=",
            "logger.tags=")
METRIC_NAMES = {"train_accuracy": "train_mean_token_accuracy"}  # results.csv's column → the API's metric name


class Hyperparameters(BaseModel):
    model_config = ConfigDict(extra="forbid")
    n_epochs: Union[Auto, int] = "auto"
    batch_size: Union[Auto, int] = "auto"
    learning_rate_multiplier: Union[Auto, float] = "auto"


class Supervised(BaseModel):
    hyperparameters: Optional[Hyperparameters] = None


class Method(BaseModel):
    type: Literal["supervised"] = "supervised"
    supervised: Optional[Supervised] = None


class Wandb(BaseModel):
    project: str = Field(max_length=128)
    name: Optional[str] = Field(None, max_length=128)
    entity: Optional[str] = Field(None, max_length=128)
    tags: Optional[list[str]] = Field(None, max_length=32)


class Integration(BaseModel):
    type: Literal["wandb"]
    wandb: Wandb


class CreateJob(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(max_length=256)
    training_file: str = Field(max_length=64)
    validation_file: Optional[str] = Field(None, max_length=64)
    hyperparameters: Optional[Hyperparameters] = None
    method: Optional[Method] = None
    suffix: Optional[str] = Field(None, max_length=64)
    seed: Optional[int] = Field(None, ge=0, le=2**31 - 1)
    metadata: Optional[dict[str, str]] = Field(None, max_length=16)
    integrations: Optional[list[Integration]] = Field(None, max_length=4)


def family_of(model: str) -> str:
    """The hosted family a model name belongs to: `ft:gpt-3.5-turbo:…` → `gpt-3.5-turbo`."""
    return model.split(":")[1] if model.startswith("ft:") else model


def _training_file(server, file_id: Optional[str], param: str) -> Optional[Path]:
    if file_id is None:
        return None
    row = server.index.file(file_id)
    if row is None or row["purpose"] != "fine-tune":
        raise APIError(400, f"invalid {param}: {file_id} is not an uploaded fine-tune file on this server "
                       "(client.files.create(file=…, purpose='fine-tune') first)", param=param,
                       code=f"invalid_{param}")
    return Path(row["path"])


def job_overrides(server, body: CreateJob, family: str, hyperparameters: Hyperparameters,
                  init_adapter: Optional[Path], train_path: Path, valid_path: Optional[Path]) -> list[str]:
    """The `ftlab train` overrides of a job: the serve command's, then what the request decides."""
    args = [o for o in server.job_overrides if not o.lstrip("+~").startswith(JOB_KEYS)]
    args += [f"model={family}", "data=custom", f"data.train_file={quote_value(str(train_path))}"]
    if valid_path is not None:
        args.append(f"data.validation_file={quote_value(str(valid_path))}")
    for key, value in hyperparameters.model_dump().items():
        args.append(f"train.{key}={value}")
    if body.suffix is not None:
        args.append(f"suffix={quote_value(body.suffix)}")
    if body.seed is not None:
        args.append(f"train.seed={body.seed}")
    if init_adapter is not None:
        args.append(f"init_adapter={quote_value(str(init_adapter))}")
    wandb = next((i.wandb for i in body.integrations or [] if i.type == "wandb"), None)
    if wandb is not None and "WandbLogger" in str((server.cfg.get("logger") or {}).get("_target_", "")):
        args.append(f"logger.project={quote_value(wandb.project)}")
        if wandb.name:
            args.append(f"logger.run_name={quote_value(wandb.name)}")
        if wandb.tags:
            args.append("logger.tags=[" + ",".join(quote_value(tag) for tag in wandb.tags) + "]")
    return args


@router.post("/fine_tuning/jobs")
def create_job(request: Request, body: CreateJob) -> dict:
    """POST /v1/fine_tuning/jobs: the job is recorded at once (validating_files); its files are checked next."""
    from trainer.hyperparams import SettingsError, check_job_settings
    from trainer.serve.runner import compose_job_config

    server = request.app.state.server
    hyperparameters = body.hyperparameters or Hyperparameters()
    if body.method is not None and body.method.supervised and body.method.supervised.hyperparameters:
        hyperparameters = body.method.supervised.hyperparameters
    family, init_adapter = body.model, None
    if body.model.startswith("ft:"):
        try:
            parent = resolve_job(body.model, str(server.root), paths=False)
        except JobNotFound:
            raise not_found("model", body.model, "model") from None
        if not (parent.adapter_dir / "adapter_config.json").is_file():
            raise APIError(400, f"{body.model} has no adapter to continue from (status "
                           f"{parent.record.get('status')})", param="model", code="invalid_model")
        family, init_adapter = family_of(parent.record["model"]), parent.adapter_dir
    elif body.model not in families():
        raise APIError(400, f"model={body.model!r} cannot be fine-tuned here; choose one of {', '.join(families())} "
                       "or an ft: model to continue from", param="model", code="model_not_available")
    train_path = _training_file(server, body.training_file, "training_file")
    valid_path = _training_file(server, body.validation_file, "validation_file")
    overrides = job_overrides(server, body, family, hyperparameters, init_adapter, train_path, valid_path)
    try:
        cfg = compose_job_config(overrides)
        check_job_settings(cfg)
    except SettingsError as error:
        param = "suffix" if error.code == "invalid_suffix" else "hyperparameters"
        raise APIError(400, str(error), param=param, code=error.code) from None
    except Exception as error:  # noqa: BLE001 - an override Hydra refuses is a bad request
        raise APIError(400, f"invalid job settings: {error}", code="invalid_request") from None
    job_id = new_job_id()
    run_dir = server.root / "jobs" / job_id
    run_dir.mkdir(parents=True)
    method = {"type": "supervised", "supervised": {"hyperparameters": hyperparameters.model_dump()}}
    job = Job.create(run_dir, model=body.model, org=cfg.org, suffix=cfg.suffix, training_file=train_path,
                     validation_file=valid_path, backbone=cfg.backbone.name, seed=cfg.train.seed, job_id=job_id,
                     metadata=body.metadata or {}, method=method, user_provided_suffix=body.suffix,
                     integrations=[i.model_dump(exclude_none=True) for i in body.integrations or []])
    job.record["training_file"]["id"] = body.training_file
    if job.record["validation_file"]:
        job.record["validation_file"]["id"] = body.validation_file
    job.save()
    EventLog(run_dir / "events.jsonl").add(f"Created fine-tuning job: {job_id}")
    row = server.index.add_job(job_id=job_id, created_at=job.record["created_at"], run_dir=run_dir,
                               request=body.model_dump(exclude_none=True) | {"overrides": overrides},
                               metadata=body.metadata or {}, training_file=body.training_file,
                               validation_file=body.validation_file)
    server.runner.wake()
    return job_object(server, row)


def job_row(server, job_id: str) -> dict:
    """The index row of a job id, or 404."""
    row = server.index.job(job_id)
    if row is None:
        raise not_found("job", job_id, "fine_tuning_job_id")
    return row


def job_progress(run_dir: Path) -> dict:
    """From events.jsonl: when training (last) started, the newest step and the total (metrics events)."""
    started, step, total = None, 0, None
    path = run_dir / "events.jsonl"
    for line in path.read_text(encoding="utf-8").splitlines() if path.is_file() else []:
        try:
            event = json.loads(line)
        except ValueError:
            continue  # a line cut by a kill mid-write
        message = str(event.get("message", ""))
        if message.startswith("Fine-tuning job started"):
            started, step = event.get("created_at"), 0
            match = re.match(r"Fine-tuning job started: (\d+) steps", message)
            total = int(match.group(1)) if match else total
        elif event.get("type") == "metrics":
            data = event.get("data") or {}
            step, total = data.get("step", step), data.get("total_steps", total)
    return {"started_at": started, "step": step, "total_steps": total}


def _estimated_finish(record: dict, run_dir: Path) -> Optional[int]:
    """While a job runs: when it should end, from its pace so far, else from the estimate."""
    if record.get("status") != "running":
        return None
    progress, now = job_progress(run_dir), time.time()
    started, step, total = progress["started_at"], progress["step"], progress["total_steps"]
    if started and step and total:
        return int(now + (now - started) / step * (total - step))
    try:
        seconds = json.loads((run_dir / "estimate.json").read_text())["local"]["wall_time_s"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return int((started or now) + seconds) if seconds else None


def job_object(server, row: dict) -> dict:
    """The hosted API's fine_tuning.job for a job of this server, from its run dir's record."""
    run_dir = Path(row["run_dir"])
    record = Job.load(run_dir).record
    request = row["request"]
    resolved = record.get("hyperparameters") or {}
    asked = (request.get("method") or {}).get("supervised", {}).get("hyperparameters") \
        or request.get("hyperparameters") or {}
    hyperparameters = {key: resolved.get(key, asked.get(key, "auto"))
                       for key in ("n_epochs", "batch_size", "learning_rate_multiplier")}
    status = record.get("status")
    return {
        "object": "fine_tuning.job",
        "id": row["id"],
        "created_at": record["created_at"],
        "error": record.get("error"),
        "fine_tuned_model": record.get("fine_tuned_model"),
        "finished_at": record.get("finished_at"),
        "hyperparameters": hyperparameters,
        "model": record.get("model"),
        "organization_id": record.get("organization_id"),
        "result_files": server.runner.publish_results(row["id"]) if status == "succeeded"
        else server.index.job_result_files(row["id"]),
        "seed": record.get("seed"),
        "status": status,
        "trained_tokens": record.get("trained_tokens"),
        "training_file": row["training_file"],
        "validation_file": row["validation_file"],
        "estimated_finish": _estimated_finish(record, run_dir),
        "integrations": record.get("integrations") or [],
        "metadata": row["metadata"] or None,
        "method": {"type": "supervised", "supervised": {"hyperparameters": hyperparameters}},
        "user_provided_suffix": record.get("user_provided_suffix"),
        "usage_metrics": None,
        "shared_with_openai": False,
        "eval_id": None,
    }


@router.get("/fine_tuning/jobs")
def list_jobs(request: Request, after: Optional[str] = None,
              limit: int = Query(DEFAULT_LIMIT, ge=1, le=100)) -> dict:
    """GET /v1/fine_tuning/jobs: newest first, paged by `after` (exclusive) and `limit`; `metadata[k]=v` filters."""
    server = request.app.state.server
    metadata = {key[len("metadata["):-1]: value for key, value in request.query_params.items()
                if key.startswith("metadata[") and key.endswith("]")}
    rows, has_more = server.index.jobs(limit=limit, after=after, metadata=metadata)
    return {"object": "list", "data": [job_object(server, row) for row in rows], "has_more": has_more}


@router.get("/fine_tuning/jobs/{job_id}")
def retrieve_job(request: Request, job_id: str) -> dict:
    """GET /v1/fine_tuning/jobs/{id}."""
    server = request.app.state.server
    return job_object(server, job_row(server, job_id))


def _act(request: Request, job_id: str, action: str, allowed: tuple[str, ...]) -> dict:
    server = request.app.state.server
    row = job_row(server, job_id)
    status = Job.load(Path(row["run_dir"])).record.get("status")
    if row["state"] not in allowed or row.get("wanted") or status in ("succeeded", "failed", "cancelled"):
        raise APIError(409, f"Cannot {action} {job_id}: it is {status}"
                       + (f" and already asked to {row['wanted']}" if row.get("wanted") else ""),
                       param="fine_tuning_job_id", code="invalid_job_state")
    getattr(server.runner, action)(job_id)
    return job_object(server, server.index.job(job_id))


@router.post("/fine_tuning/jobs/{job_id}/cancel")
def cancel_job(request: Request, job_id: str) -> dict:
    """POST …/cancel: a job not started is cancelled at once; a running one checkpoints and stops."""
    return _act(request, job_id, "cancel", ("validating_files", "queued", "running", "paused"))


@router.post("/fine_tuning/jobs/{job_id}/pause")
def pause_job(request: Request, job_id: str) -> dict:
    """POST …/pause: the job writes a checkpoint and stops in status `paused`."""
    return _act(request, job_id, "pause", ("queued", "running"))


@router.post("/fine_tuning/jobs/{job_id}/resume")
def resume_job(request: Request, job_id: str) -> dict:
    """POST …/resume: a paused job goes back in the queue and continues from its checkpoint."""
    return _act(request, job_id, "resume", ("paused",))


def job_ref(row: dict) -> JobRef:
    """The job of an index row as `trainer.jobs` finds jobs (for its events and checkpoints)."""
    run_dir = Path(row["run_dir"])
    return JobRef(Job.load(run_dir).record, run_dir, run_dir / "adapter")


def _metrics(data: dict) -> dict:
    return {METRIC_NAMES.get(key, key): value for key, value in data.items()}


@router.get("/fine_tuning/jobs/{job_id}/events")
def list_job_events(request: Request, job_id: str, after: Optional[str] = None,
                    limit: int = Query(DEFAULT_LIMIT, ge=1, le=1000)) -> dict:
    """GET …/events: newest first, paged by `after` (an event id, exclusive) and `limit`."""
    server = request.app.state.server
    listing = list_events(job_ref(job_row(server, job_id)), limit=10**9)["data"]
    data = [event | {"created_at": int(event.get("created_at") or 0),
                     "data": _metrics(event.get("data") or {}) if event.get("type") == "metrics" else event.get("data")}
            for event in listing]
    try:
        return page(data, limit, after)
    except JobNotFound:
        raise APIError(400, f"after={after}: no such event in {job_id}", param="after", code="invalid_cursor") from None


@router.get("/fine_tuning/jobs/{job_id}/checkpoints")
def list_job_checkpoints(request: Request, job_id: str, after: Optional[str] = None,
                         limit: int = Query(10, ge=1, le=100)) -> dict:
    """GET …/checkpoints: the kept checkpoints, newest first, each usable as a model by its name."""
    server = request.app.state.server
    checkpoints = [{key: value for key, value in checkpoint.items() if key != "path"}
                   | {"metrics": _metrics(checkpoint["metrics"]) | {"step": checkpoint["step_number"]}}
                   for checkpoint in list_checkpoints(job_ref(job_row(server, job_id)))]
    try:
        listing = page(checkpoints, limit, after)
    except JobNotFound:
        raise APIError(400, f"after={after}: no such checkpoint in {job_id}", param="after",
                       code="invalid_cursor") from None
    data = listing["data"]
    return listing | {"first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None}
