"""A job's request record: what a client asked for, handed to the job as data, never as config text.

`ftlab serve` writes `<run dir>/request.json` when it creates a job, and the job's `ftlab train`
gets only a pointer to it (`request=<path>`), beside overrides the server made itself. Every
reader takes the request's values the same way, through `apply_request`: the server checking a
job before it records it, the server validating its files, the job process, and anything that
loads a finished job's config (resume, chat, eval, export, the model pool).

A value reaches the config as data: a string is stored with `trainer.compose.literal`, so
OmegaConf never resolves `${...}` in it. The wandb integration's free text (project, name, tags)
does not enter the config at all: `logger_options` hands it to the logger as plain arguments.
"""
import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Optional

from trainer.compose import compose, literal
from trainer.files import write_json

REQUEST_FILE = "request.json"
HYPERPARAMETERS = ("n_epochs", "batch_size", "learning_rate_multiplier")
METHOD_HYPERPARAMETERS = {"supervised": (), "dpo": ("beta",),
                          "reinforcement": ("eval_interval", "eval_samples", "compute_multiplier", "reasoning_effort")}
WORDS = ("auto", "default", "low", "medium", "high")  # the words a method hyperparameter may be


class RequestError(ValueError):
    """A request record that is not what ftlab serve writes."""


@dataclass(frozen=True)
class JobRequest:
    """The create request of one job, as the server checked it."""

    training_file: str  # the server's own path of the uploaded training file
    validation_file: Optional[str] = None
    training_file_id: Optional[str] = None  # file-…: the client's name for it (records only)
    validation_file_id: Optional[str] = None
    model: Optional[str] = None  # as asked: a family or an ft: model (records only)
    suffix: Optional[str] = None  # already checked against trainer.hyperparams.SUFFIX
    seed: Optional[int] = None
    hyperparameters: dict = field(default_factory=dict)  # n_epochs, batch_size, learning_rate_multiplier: auto | number
    init_adapter: Optional[str] = None  # the adapter folder of the ft: model it continues from
    wandb: Optional[dict] = None  # {project, name, tags}: the logger's arguments, as the client wrote them
    method: str = "supervised"  # the hosted API's method.type: supervised | dpo | reinforcement
    method_hyperparameters: dict = field(default_factory=dict)  # the method's own: beta; compute_multiplier, …
    grader: Optional[dict] = None  # method=reinforcement: the grader object, validated at create
    metadata: dict = field(default_factory=dict)  # records only

    def __post_init__(self):
        _check(self)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data) -> "JobRequest":
        if not isinstance(data, dict) or set(data) - {f.name for f in fields(cls)}:
            raise RequestError(f"not a job request record: {str(data)[:200]}")
        return cls(**data)


def _check(request: JobRequest) -> None:
    """Every field has the type the server wrote; a hand-edited record cannot smuggle in anything else."""
    def text(value, name, optional=True):
        if not (isinstance(value, str) or optional and value is None):
            raise RequestError(f"{name} must be text, not {type(value).__name__}")

    text(request.training_file, "training_file", optional=False)
    for name in ("validation_file", "training_file_id", "validation_file_id", "model", "suffix", "init_adapter"):
        text(getattr(request, name), name)
    if request.seed is not None and (isinstance(request.seed, bool) or not isinstance(request.seed, int)):
        raise RequestError(f"seed must be a whole number, not {request.seed!r}")
    for key, value in request.hyperparameters.items():
        number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if key not in HYPERPARAMETERS or not (value == "auto" or number):
            raise RequestError(f"hyperparameters.{key}={value!r}: expected one of {HYPERPARAMETERS}, auto or a number")
    if request.wandb is not None:
        if not isinstance(request.wandb, dict) or set(request.wandb) - {"project", "name", "entity", "tags"}:
            raise RequestError("wandb must hold project, name, entity and tags")
        tags = request.wandb.get("tags") or []
        if not isinstance(tags, list) or not all(isinstance(tag, str) for tag in tags):
            raise RequestError("wandb.tags must be a list of text")
    if request.method not in METHOD_HYPERPARAMETERS:
        raise RequestError(f"method={request.method!r}: expected one of {', '.join(METHOD_HYPERPARAMETERS)}")
    for key, value in request.method_hyperparameters.items():
        number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if key not in METHOD_HYPERPARAMETERS[request.method] or not (value in WORDS or number):
            raise RequestError(f"method.{request.method}.hyperparameters.{key}={value!r}: expected one of "
                               f"{METHOD_HYPERPARAMETERS[request.method]}, auto or a number")
    if request.grader is not None and not isinstance(request.grader, dict):
        raise RequestError("grader must be a JSON object")
    if not isinstance(request.metadata, dict) or not all(isinstance(v, str) for v in request.metadata.values()):
        raise RequestError("metadata must map text to text")


def write_request(run_dir: Path, request: JobRequest) -> Path:
    """`<run dir>/request.json`, written atomically."""
    return write_json(Path(run_dir) / REQUEST_FILE, request.to_json())


def read_request(path) -> JobRequest:
    """The request record at `path` (a request.json, or the run dir holding one)."""
    path = Path(path)
    if path.is_dir():
        path = path / REQUEST_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise RequestError(f"cannot read the job's request record {path}: {error}") from None
    return JobRequest.from_json(data)


def apply_request(cfg, request: JobRequest):
    """Set the request's values in a composed config, as literals; returns `cfg`."""
    cfg.data.train_file = literal(request.training_file)
    cfg.data.validation_file = literal(request.validation_file) if request.validation_file else None
    if request.suffix is not None:
        cfg.suffix = literal(request.suffix)
    if request.seed is not None:
        cfg.train.seed = request.seed
    for key, value in request.hyperparameters.items():
        cfg.train[key] = value
    if request.init_adapter is not None:
        cfg.init_adapter = literal(request.init_adapter)
    for key, value in request.method_hyperparameters.items():  # checked: auto, a number or an effort's name
        cfg.method[request.method][key] = value
    return cfg


def with_request(cfg):
    """`cfg` with the values of the request record it points to (`request=…`), if any."""
    return apply_request(cfg, read_request(cfg.request)) if cfg.get("request") else cfg


def job_config(overrides, request: JobRequest):
    """The config of a job the server runs: its overrides (all made by the server), then the request as data."""
    return apply_request(compose(overrides), request)


def logger_options(cfg) -> dict:
    """The wandb integration's project, name and tags for the job's logger, when it logs to wandb; they are
    passed to the logger as plain arguments, so nothing a client wrote is ever resolved as config."""
    if not cfg.get("request") or "WandbLogger" not in str((cfg.get("logger") or {}).get("_target_", "")):
        return {}
    wandb = read_request(cfg.request).wandb or {}
    options = {"project": wandb.get("project"), "run_name": wandb.get("name"), "tags": wandb.get("tags")}
    return {key: value for key, value in options.items() if value}
