"""`/ui/api/...`: what the pages need beyond `/v1`, read from the same records (the index, the run
directories) and made by the same library functions; behind the same key check as the API
(`trainer.serve.auth.Guard`, the app's middleware).

    GET /ui/api/jobs?status=&after=&limit=      jobs (fine_tuning.job objects) filtered by status, paged as the API
    GET /ui/api/jobs/{id}                       the job with its request, validation.json, estimate.json and progress
    GET /ui/api/jobs/{id}/metrics?after_step=   results.csv rows (the charts)
    GET /ui/api/jobs/{id}/histogram             token lengths of the job's files
    GET /ui/api/jobs/{id}/adapter.zip[?step=]   the adapter (or a checkpoint's) as a zip
    GET /ui/api/jobs/{id}/results.csv           results.csv, also while the job runs
    GET /ui/api/files                           uploaded files with their validation state
    GET /ui/api/files/{id}/report?model=        a file's validation report and histogram
    GET /ui/api/estimate?training_file=&model=&n_epochs=&validation_file=   the price of a job
    GET /ui/api/models                          families, ft: models and checkpoints, with their format
"""
import csv
import json
import re
import tempfile
import zipfile
from pathlib import Path
from typing import Literal, Optional

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse, StreamingResponse

from trainer.serve.errors import APIError, not_found
from trainer.serve.ui import reports

router = APIRouter(prefix="/ui/api", include_in_schema=False)
Status = Literal["validating_files", "queued", "running", "paused", "succeeded", "failed", "cancelled"]


Method = Literal["supervised", "dpo", "reinforcement"]  # jobs_api.METHODS: a query value, never config text


def _server(request: Request):
    return request.app.state.server


def _read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _file_row(server, file_id: Optional[str], param: str = "file_id") -> Optional[dict]:
    if not file_id:
        return None
    row = server.index.file(file_id)
    if row is None or not Path(row["path"]).is_file():
        raise not_found("file", file_id, param)
    return row


def _family(model: Optional[str], row: dict) -> str:
    from trainer.serve.models_api import families

    if model is None:
        return reports.guess_family(Path(row["path"]))
    if model not in families():
        raise APIError(400, f"model={model!r}: choose one of {', '.join(families())}", param="model",
                       code="model_not_available")
    return model


# ---- jobs ----------------------------------------------------------------------------------
@router.get("/jobs")
def jobs(request: Request, status: Optional[Status] = None, after: Optional[str] = None,
         limit: int = Query(20, ge=1, le=100)) -> dict:
    """The API's job list with a status filter: newest first, `after` an exclusive cursor, exact `has_more`."""
    from trainer.serve.jobs_api import job_object

    server = _server(request)
    data, cursor = [], after
    while True:
        rows, more = server.index.jobs(limit=100, after=cursor)
        for row in rows:
            job = job_object(server, row)
            if status is None or job["status"] == status:
                if len(data) == limit:
                    return {"object": "list", "data": data, "has_more": True}
                data.append(job)
        if not more:
            return {"object": "list", "data": data, "has_more": False}
        cursor = rows[-1]["id"]


def _file_info(server, file_id: Optional[str]) -> Optional[dict]:
    from trainer.serve.files_api import file_object

    if not file_id:
        return None
    row = server.index.file(file_id)
    return file_object(row) if row is not None else {"id": file_id, "deleted": True}


@router.get("/jobs/{job_id}")
def job(request: Request, job_id: str) -> dict:
    """Everything the job page shows beyond the API's objects: the request, the run dir's validation.json
    and estimate.json, progress, which files and downloads exist."""
    from trainer.serve.jobs_api import family_of, job_object, job_progress, job_row

    server = _server(request)
    row = job_row(server, job_id)
    run_dir = Path(row["run_dir"])
    job = job_object(server, row)
    request_body = row["request"]
    asked = (request_body.get("method") or {}).get("supervised", {}).get("hyperparameters") \
        or request_body.get("hyperparameters") or {}
    record = _read_json(run_dir / "job.json") or {}
    names = {}  # validation.json names files by their server path; show the uploaded filename instead
    for key in ("training_file", "validation_file"):
        path, file_row = (record.get(key) or {}).get("path"), server.index.file(row[key]) if row[key] else None
        if path:
            names[str(path)] = file_row["filename"] if file_row else row[key]
    estimate = _read_json(run_dir / "estimate.json")
    if estimate is not None:
        estimate["training_file"] = row["training_file"]
    return {
        "job": job,
        "family": family_of(job["model"] or ""),
        "requested": {key: asked.get(key, "auto") for key in ("n_epochs", "batch_size", "learning_rate_multiplier")},
        "suffix": request_body.get("suffix"),
        "validation": reports.public_validation(_read_json(run_dir / "validation.json"), names),
        "estimate": estimate,
        "progress": job_progress(run_dir),
        "files": {"training": _file_info(server, row["training_file"]),
                  "validation": _file_info(server, row["validation_file"])},
        "downloads": {"adapter": (run_dir / "adapter" / "adapter_config.json").is_file(),
                      "results": (run_dir / "results.csv").is_file()},
    }


@router.get("/jobs/{job_id}/metrics")
def metrics(request: Request, job_id: str, after_step: int = Query(0, ge=0)) -> dict:
    """results.csv's rows after `after_step`, with the API's metric names, and the method's own metrics of each step
    (a `<kind>_results.csv` beside it: DPO's preference metrics, reinforcement's rewards)."""
    from trainer.serve.jobs_api import METRIC_NAMES, job_row

    run_dir = Path(job_row(_server(request), job_id)["run_dir"])
    rows: dict[int, dict] = {}
    for path in [run_dir / "results.csv", *sorted(run_dir.glob("*_results.csv"))]:
        if not path.is_file():
            continue
        with open(path, newline="", encoding="utf-8") as handle:
            for raw in csv.DictReader(handle):
                try:
                    step = int(raw["step"])
                except (KeyError, TypeError, ValueError):
                    continue
                if step > after_step:
                    rows.setdefault(step, {"step": step}).update(
                        {METRIC_NAMES.get(key, key): _number(value) for key, value in raw.items() if key != "step"})
    return {"object": "list", "data": [rows[step] for step in sorted(rows)]}


def _number(value) -> Optional[float]:
    try:
        return float(value) if value not in ("", None) else None
    except ValueError:
        return None


@router.get("/jobs/{job_id}/histogram")
def job_histogram(request: Request, job_id: str) -> dict:
    """Token lengths of the job's training and validation files (while they are still uploaded)."""
    from trainer.serve.jobs_api import job_row, family_of

    server = _server(request)
    row = job_row(server, job_id)
    record = _read_json(Path(row["run_dir"]) / "job.json") or {}
    family = family_of(record.get("model") or "")
    series, context_length, missing = {}, 4096, []
    for kind, key in (("train", "training_file"), ("validation", "validation_file")):
        file_row = server.index.file(row[key]) if row[key] else None
        if row[key] and (file_row is None or not Path(file_row["path"]).is_file()):
            missing.append(row[key])
        elif file_row is not None:
            report = reports.file_report(server, file_row, family)
            series[kind], context_length = report["token_counts"], report["context_length"]
    return reports.histogram(series, context_length) | {"missing_files": missing}


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "adapter"


@router.get("/jobs/{job_id}/adapter.zip")
def adapter_zip(request: Request, job_id: str, step: Optional[int] = Query(None, ge=0)):
    """The job's adapter folder (PEFT format), or a checkpoint's with `step`, as a zip."""
    from trainer.jobs import list_checkpoints
    from trainer.serve.jobs_api import job_ref, job_row

    ref = job_ref(job_row(_server(request), job_id))
    name = ref.record.get("fine_tuned_model") or job_id
    if step is None:
        folder = ref.run_dir / "adapter"
    else:
        found = next((c for c in list_checkpoints(ref) if c["step_number"] == step), None)
        if found is None:
            raise APIError(404, f"{job_id} has no checkpoint at step {step}", param="step", code="checkpoint_not_found")
        folder, name = Path(found["path"]), found["fine_tuned_model_checkpoint"]
    if not folder.is_dir() or not any(folder.iterdir()):
        raise APIError(404, f"{job_id} has no adapter yet (status {ref.record.get('status')})",
                       code="adapter_not_found")
    spool = tempfile.SpooledTemporaryFile(max_size=64 << 20)
    with zipfile.ZipFile(spool, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(folder.rglob("*")):
            if path.is_file() and not path.is_symlink():
                archive.write(path, Path(_safe_name(name)) / path.relative_to(folder))
    size = spool.tell()
    spool.seek(0)

    def chunks():
        with spool:
            while block := spool.read(1 << 20):
                yield block

    return StreamingResponse(chunks(), media_type="application/zip", headers={
        "Content-Disposition": f'attachment; filename="{_safe_name(name)}-adapter.zip"',
        "Content-Length": str(size)})


@router.get("/jobs/{job_id}/results.csv")
def results_csv(request: Request, job_id: str):
    """The job's results.csv (step, train_loss, train_accuracy, valid_loss, valid_mean_token_accuracy)."""
    from trainer.serve.jobs_api import job_row

    path = Path(job_row(_server(request), job_id)["run_dir"]) / "results.csv"
    if not path.is_file():
        raise APIError(404, f"{job_id} has no results yet", code="results_not_found")
    return FileResponse(path, media_type="text/csv", filename=f"{job_id}-results.csv")


# ---- files ---------------------------------------------------------------------------------
@router.get("/files")
def files(request: Request) -> dict:
    """Uploaded files (the API's FileObjects, newest first) with the verdict of their report, if made."""
    from trainer.serve.files_api import file_object

    server = _server(request)
    rows, _ = server.index.files(limit=10000)
    reports.forget_deleted(server)
    data = []
    for row in rows:
        report = reports.cached_report(server, row["id"]) if row["purpose"] == "fine-tune" else None
        data.append(file_object(row) | {"validation": reports.summary(report) if report else None})
    return {"object": "list", "data": data, "has_more": False}


@router.get("/files/{file_id}/report")
def file_report(request: Request, file_id: str, model: Optional[str] = None, method: Optional[Method] = None) -> dict:
    """The file's validation as a training file of `model` (default: the family its format fits) and `method`
    (default: the method its first line fits), with the token-length histogram; made on first request."""
    server = _server(request)
    row = _file_row(server, file_id)
    if row["purpose"] != "fine-tune":
        raise APIError(400, f"{file_id} is a {row['purpose']} file, not a training file", param="file_id",
                       code="invalid_file")
    family = _family(model, row)
    method = method or reports.guess_method(Path(row["path"]))
    try:
        report = reports.file_report(server, row, family, method)
    except ValueError as error:
        raise APIError(400, f"cannot check {file_id}: {error}", code="invalid_file") from None
    result = {key: value for key, value in report.items() if key != "token_counts"}
    return result | {"file": reports.summary(report) | {"filename": row["filename"], "bytes": row["bytes"]},
                     "histogram": reports.histogram({"train": report["token_counts"]}, report["context_length"])}


@router.get("/estimate")
def estimate(request: Request, training_file: str, model: Optional[str] = None, n_epochs: str = "auto",
             validation_file: Optional[str] = None, method: Method = "supervised") -> dict:
    """estimate.json for a job on `training_file` (and `validation_file`) with `model` and `n_epochs`."""
    server = _server(request)
    train_row = _file_row(server, training_file, "training_file")
    valid_row = _file_row(server, validation_file, "validation_file")
    if n_epochs != "auto" and not (n_epochs.isdigit() and 0 < int(n_epochs) <= 1000):
        raise APIError(400, f"n_epochs={n_epochs!r}: use auto or a whole number of epochs (1-1000)",
                       param="n_epochs", code="invalid_n_epochs")
    try:
        return reports.estimate(server, train_row, _family(model, train_row), n_epochs, valid_row, method)
    except ValueError as error:
        raise APIError(400, str(error), code="invalid_request") from None


# ---- models --------------------------------------------------------------------------------
@router.get("/models")
def models(request: Request) -> dict:
    """What the playground can call: families, ft: models (the API's /v1/models) and their checkpoints."""
    from trainer.jobs import list_checkpoints
    from trainer.serve.jobs_api import job_ref, family_of
    from trainer.serve.models_api import families, served_models

    server = _server(request)
    removed, known_families = server.index.removed_models(), set(families())
    data = [{"id": model["id"], "kind": "family" if model["id"] in known_families else "fine-tuned"}
            for model in served_models(server)]
    rows, cursor = [], None
    while True:
        page, more = server.index.jobs(limit=100, after=cursor)
        rows += page
        if not more:
            break
        cursor = page[-1]["id"]
    for row in rows:
        try:
            ref = job_ref(row)
        except (OSError, ValueError, KeyError):
            continue
        if not ref.record.get("fine_tuned_model") or ref.record["fine_tuned_model"] in removed:
            continue
        for checkpoint in list_checkpoints(ref):
            data.append({"id": checkpoint["fine_tuned_model_checkpoint"], "kind": "checkpoint", "job": row["id"]})
    for model in data:
        family = family_of(model["id"])
        model["family"] = family
        model["chat"] = family not in known_families or reports.family_format(family) == "chat"
    return {"object": "list", "data": data}
