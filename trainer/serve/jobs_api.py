"""`/v1/fine_tuning/jobs`: create, list, retrieve, cancel, pause and resume jobs; their events and checkpoints.

A job created here is an ordinary ftlab run directory (`<jobs_root>/jobs/<ftjob-id>/`), trained by
`ftlab train`, so the API and `ftlab jobs …` read one record. What the client asked for reaches the
job as data, never as config text: the request is checked field by field, written to
`<run dir>/request.json` (`trainer.request`), and the job's only overrides are the serve command's
own, the model family (one of conf/model/), the run dir and the pointer to that record.
"""
import json
import logging
import re
import shutil
import time
from pathlib import Path
from typing import Literal, Optional, Union

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError, WrapValidator, field_validator, model_validator
from pydantic_core import PydanticCustomError
from typing_extensions import Annotated

from trainer.compose import quote_value
from trainer.hyperparams import MAX_BATCH_SIZE, MAX_BETA, MAX_EPOCHS, MAX_LEARNING_RATE_MULTIPLIER, SUFFIX
from trainer.jobs import DEFAULT_LIMIT, JobNotFound, JobRef, list_checkpoints, list_events, page, resolve_job
from trainer.request import REQUEST_FILE, JobRequest, job_config, write_request
from trainer.run import EventLog, Job, new_job_id
from trainer.serve.errors import APIError, not_found
from trainer.serve.models_api import families
from trainer.serve.public import public_value

log = logging.getLogger("ftlab.serve")
router = APIRouter()
Auto = Literal["auto"]
# the request decides these; the serve command's own overrides of them are not passed on
JOB_KEYS = ("model=", "data=", "data.", "suffix=", "train.n_epochs=", "train.batch_size=", "method=",
            "train.learning_rate_multiplier=", "train.seed=", "init_adapter=", "request=", "resume=")
METRIC_NAMES = {"train_accuracy": "train_mean_token_accuracy"}  # results.csv's column → the API's metric name


def _auto_or(kind, what: str, **bounds):
    """`auto` or a `kind` within `bounds` (pydantic's own checks, strict: no "3", no true, no NaN or Infinity),
    refused as one error on the field itself rather than one per branch of the union."""
    def one_error(value, handler):
        try:
            return handler(value)
        except ValidationError as error:
            detail = next((e["msg"] for e in error.errors() if e["type"] != "literal_error"), "Invalid value")
            raise PydanticCustomError("invalid_hyperparameter", "{detail}; use 'auto' or {what}",
                                      {"detail": detail, "what": what}) from None

    return Annotated[Union[Auto, Annotated[kind, Field(strict=True, **bounds)]], WrapValidator(one_error)]


class Hyperparameters(BaseModel):
    """A supervised job's hyperparameters, in the hosted API's ranges."""

    model_config = ConfigDict(extra="forbid")
    n_epochs: _auto_or(int, f"a whole number from 1 to {MAX_EPOCHS}", ge=1, le=MAX_EPOCHS) = "auto"
    batch_size: _auto_or(int, f"a whole number from 1 to {MAX_BATCH_SIZE}", ge=1, le=MAX_BATCH_SIZE) = "auto"
    learning_rate_multiplier: _auto_or(float, f"a number above 0 and at most {MAX_LEARNING_RATE_MULTIPLIER:g}", gt=0,
                                       le=MAX_LEARNING_RATE_MULTIPLIER, allow_inf_nan=False) = "auto"


class DpoHyperparameters(Hyperparameters):
    """A DPO job's: the supervised ones and beta."""

    beta: _auto_or(float, f"a number above 0 and at most {MAX_BETA:g}", gt=0, le=MAX_BETA, allow_inf_nan=False) = "auto"


class ReinforcementHyperparameters(Hyperparameters):
    """A reinforcement job's: the supervised ones and the hosted API's reinforcement ones."""

    eval_interval: _auto_or(int, "a whole number from 1", ge=1, le=1_000_000) = "auto"
    eval_samples: _auto_or(int, "a whole number from 1", ge=1, le=1_000_000) = "auto"
    compute_multiplier: _auto_or(float, "a number above 0 and at most 10", gt=0, le=10, allow_inf_nan=False) = "auto"
    reasoning_effort: Literal["default", "low", "medium", "high"] = "default"


class Supervised(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hyperparameters: Optional[Hyperparameters] = None


class Dpo(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hyperparameters: Optional[DpoHyperparameters] = None


class Reinforcement(BaseModel):
    model_config = ConfigDict(extra="forbid")
    grader: dict  # validated by trainer.graders at create (a 400 naming the field)
    hyperparameters: Optional[ReinforcementHyperparameters] = None


class Method(BaseModel):
    """The hosted API's `method`: its type and that type's object (the others absent)."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["supervised", "dpo", "reinforcement"] = "supervised"
    supervised: Optional[Supervised] = None
    dpo: Optional[Dpo] = None
    reinforcement: Optional[Reinforcement] = None

    @model_validator(mode="after")
    def _one_type(self) -> "Method":
        others = [name for name in METHODS if name != self.type and getattr(self, name) is not None]
        if others:
            raise ValueError(f"method.type is {self.type!r}, and method.{others[0]} is given: send the object of "
                             "that type only")
        if self.type == "reinforcement" and self.reinforcement is None:
            raise ValueError("method.type 'reinforcement' needs method.reinforcement.grader")
        return self

    def hyperparameters(self) -> Hyperparameters:
        """The method's hyperparameters as sent (defaults: all auto)."""
        chosen = getattr(self, self.type)
        kind = {"supervised": Hyperparameters, "dpo": DpoHyperparameters,
                "reinforcement": ReinforcementHyperparameters}[self.type]
        return (chosen.hyperparameters if chosen is not None else None) or kind()


METHODS = ("supervised", "dpo", "reinforcement")
TRAIN_HYPERPARAMETERS = ("n_epochs", "batch_size", "learning_rate_multiplier")


Text = Annotated[str, Field(max_length=128)]
WANDB_FORBIDDEN = "/\\#?%:"  # wandb refuses these in a project name: the job would fail as it starts


class Wandb(BaseModel):
    project: Text
    name: Optional[Text] = None
    entity: Optional[Text] = None
    tags: Optional[list[Annotated[str, Field(max_length=64)]]] = Field(None, max_length=32)

    @field_validator("project", "entity")
    @classmethod
    def _wandb_name(cls, value: Optional[str]) -> Optional[str]:
        if value is not None and (not value or any(ch in value for ch in WANDB_FORBIDDEN)):
            raise ValueError(f"a wandb project or entity cannot be empty or contain any of {' '.join(WANDB_FORBIDDEN)}")
        return value


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
    suffix: Optional[str] = None  # checked as raw text first thing (invalid_suffix)
    seed: Optional[int] = Field(None, ge=0, le=2**31 - 1, strict=True)
    metadata: Optional[dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]]] = \
        Field(None, max_length=16)
    integrations: Optional[list[Integration]] = Field(None, max_length=4)


def family_of(model: str) -> str:
    """The hosted family a model name belongs to: `ft:gpt-3.5-turbo:…` → `gpt-3.5-turbo`."""
    return model.split(":")[1] if model.startswith("ft:") else model


def check_suffix(suffix: Optional[str]) -> None:
    """400 `invalid_suffix` unless the raw suffix is up to 64 letters, digits, '-', '_' or '.' (it becomes part
    of the model name); the message never repeats what was sent."""
    if suffix is not None and not SUFFIX.fullmatch(suffix):
        raise APIError(400, "Invalid suffix: use up to 64 letters, digits, '-', '_' or '.' (it becomes part of the "
                       "model name ft:<model>:<org>:<suffix>:<id>)", param="suffix", code="invalid_suffix")


def base_overrides(server, family: str) -> list[str]:
    """The overrides of every job on `family`: the serve command's own (less what a request decides), then the
    family, checked against conf/model/."""
    if family not in families():
        raise APIError(400, f"{family!r} is not a model family of this server; choose one of {', '.join(families())}",
                       param="model", code="model_not_available")
    kept = [o for o in server.job_overrides if not o.lstrip("+~").startswith(JOB_KEYS)]
    return [*kept, f"model={family}", "data=custom"]


def _parent(server, model: str) -> tuple[str, Optional[str]]:
    """The family a create request trains and the adapter it starts from (an ft: model's, or none)."""
    if not model.startswith("ft:"):
        if model not in families():
            raise APIError(400, f"model={model!r} cannot be fine-tuned here; choose one of {', '.join(families())} "
                           "or an ft: model to continue from", param="model", code="model_not_available")
        return model, None
    if server.index.model_removed(model):
        raise not_found("model", model, "model")
    try:
        parent = resolve_job(model, str(server.root), paths=False)
    except JobNotFound:
        raise not_found("model", model, "model") from None
    if not (parent.adapter_dir / "adapter_config.json").is_file():
        raise APIError(400, f"{model} has no adapter to continue from (status {parent.record.get('status')})",
                       param="model", code="invalid_model")
    return family_of(parent.record["model"]), str(parent.adapter_dir)


def _file_path(rows: dict, file_id: Optional[str], param: str) -> Optional[str]:
    if file_id is None:
        return None
    row = rows.get(file_id)
    if row is None or row["purpose"] != "fine-tune" or not Path(row["path"]).is_file():
        raise APIError(400, f"invalid {param}: {file_id} is not an uploaded fine-tune file on this server "
                       "(client.files.create(file=…, purpose='fine-tune') first)", param=param,
                       code=f"invalid_{param}")
    return row["path"]


@router.post("/fine_tuning/jobs")
def create_job(request: Request, body: CreateJob) -> dict:
    """POST /v1/fine_tuning/jobs: the job is recorded at once (validating_files); its files are checked next.

    Nothing is left behind by a refused request: the run dir appears only once the job is certain, and
    its files cannot be deleted from the moment they are looked up until the job's row holds them."""
    from trainer.hyperparams import SettingsError, check_job_settings

    server = request.app.state.server
    check_suffix(body.suffix)
    method = body.method or Method()
    sent = method.hyperparameters().model_dump()
    if body.method is None or body.method.type == "supervised" and not (method.supervised and
                                                                       method.supervised.hyperparameters):
        sent = (body.hyperparameters or Hyperparameters()).model_dump()  # the deprecated top-level form
    grader = _checked_grader(server, method)
    family, init_adapter = _parent(server, body.model)
    overrides = [*base_overrides(server, family), f"method={method.type}"]  # one of METHODS
    wandb = next((i.wandb for i in body.integrations or [] if i.type == "wandb"), None)
    with server.index.files_for_new_job([body.training_file, body.validation_file]) as rows:
        job_request = JobRequest(
            training_file=_file_path(rows, body.training_file, "training_file"),
            validation_file=_file_path(rows, body.validation_file, "validation_file"),
            training_file_id=body.training_file, validation_file_id=body.validation_file, model=body.model,
            suffix=body.suffix, seed=body.seed,
            hyperparameters={key: sent[key] for key in TRAIN_HYPERPARAMETERS},
            method=method.type, method_hyperparameters={k: v for k, v in sent.items() if k not in TRAIN_HYPERPARAMETERS},
            grader=grader, init_adapter=init_adapter, wandb=wandb.model_dump(exclude_none=True) if wandb else None,
            metadata=body.metadata or {})
        try:
            cfg = job_config(overrides, job_request)
            check_job_settings(cfg, job_request)
        except SettingsError as error:
            param = SETTING_PARAMS.get(error.code, "hyperparameters")
            raise APIError(400, str(error), param=param, code=error.code) from None
        except Exception:  # noqa: BLE001 - no client text reaches the config, so this is the serve command's own
            log.exception("composing a job's config")
            raise APIError(500, "The server could not compose this job's config from its own settings (the server "
                           "log has the details)", code="internal_error") from None
        job_id = new_job_id()
        run_dir = server.root / "jobs" / job_id
        try:
            row = _record_job(server, body, job_id, run_dir, job_request, cfg,
                              [*overrides, f"request={quote_value(str(run_dir / REQUEST_FILE))}"])
        except BaseException:
            shutil.rmtree(run_dir, ignore_errors=True)  # a job half made is no job
            raise
    server.runner.wake()
    return job_object(server, row)


SETTING_PARAMS = {"invalid_suffix": "suffix", "invalid_validation_file": "validation_file", "invalid_method": "method",
                  "invalid_grader": "method.reinforcement.grader", "invalid_hyperparameter": "hyperparameters"}


def _checked_grader(server, method: Method) -> Optional[dict]:
    """A reinforcement job's grader, validated as the graders API validates it (a 400 naming the field)."""
    if method.type != "reinforcement":
        return None
    from trainer.graders import GraderError, Settings, validate

    try:
        return validate(method.reinforcement.grader, settings=Settings.from_config(server.cfg.graders))
    except GraderError as error:
        param = "method.reinforcement." + error.param
        raise APIError(400, f"{param}: {error}", param=param, code="invalid_grader") from None


def _record_job(server, body: CreateJob, job_id: str, run_dir: Path, job_request: JobRequest, cfg,
                overrides: list[str]) -> dict:
    """The job's run dir (request.json, job.json, its first event), then its row in the index; the row's."""
    run_dir.mkdir(parents=True)
    write_request(run_dir, job_request)
    method = method_object(job_request.method, job_request.hyperparameters | job_request.method_hyperparameters,
                           job_request.grader)
    valid_path = Path(job_request.validation_file) if job_request.validation_file else None
    job = Job.create(run_dir, model=body.model, org=cfg.org, suffix=body.suffix,
                     training_file=Path(job_request.training_file), validation_file=valid_path,
                     backbone=cfg.backbone.name, seed=cfg.train.seed, job_id=job_id, metadata=body.metadata or {},
                     method=method, user_provided_suffix=body.suffix,
                     integrations=[i.model_dump(exclude_none=True) for i in body.integrations or []])
    job.record["training_file"]["id"] = body.training_file
    if job.record["validation_file"]:
        job.record["validation_file"]["id"] = body.validation_file
    job.save()
    EventLog(run_dir / "events.jsonl").add(f"Created fine-tuning job: {job_id}")
    return server.index.add_job(job_id=job_id, created_at=job.record["created_at"], run_dir=run_dir,
                                request=body.model_dump(exclude_none=True) | {"overrides": overrides},
                                metadata=body.metadata or {}, training_file=body.training_file,
                                validation_file=body.validation_file)


def method_object(method_type: str, hyperparameters: dict, grader: Optional[dict] = None) -> dict:
    """The job object's `method`: its type and that type's hyperparameters (and a reinforcement job's grader)."""
    detail = {"hyperparameters": hyperparameters} | ({"grader": grader} if method_type == "reinforcement" else {})
    return {"type": method_type, method_type: detail}


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
    method_type = (request.get("method") or {}).get("type", "supervised")
    asked = (request.get("method") or {}).get(method_type, {}).get("hyperparameters") \
        or request.get("hyperparameters") or {}
    hyperparameters = {key: resolved.get(key, asked.get(key, "auto")) for key in TRAIN_HYPERPARAMETERS}
    method_hyperparameters = hyperparameters | {key: resolved.get(key, value) for key, value in asked.items()
                                                if key not in TRAIN_HYPERPARAMETERS}
    grader = ((request.get("method") or {}).get("reinforcement") or {}).get("grader")
    status = record.get("status")
    return {
        "object": "fine_tuning.job",
        "id": row["id"],
        "created_at": record["created_at"],
        "error": public_value(record.get("error"), server.root, run_dir),
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
        "method": method_object(method_type, method_hyperparameters, grader),
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
    ref = job_ref(job_row(server, job_id))
    listing = list_events(ref, limit=10**9)["data"]
    data = [public_value(event, server.root, ref.run_dir)
            | {"created_at": int(event.get("created_at") or 0),
               "data": _metrics(event.get("data") or {}) if event.get("type") == "metrics"
               else public_value(event.get("data"), server.root, ref.run_dir)}
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
