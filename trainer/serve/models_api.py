"""`/v1/models`: the families the configured backbone stands in for, and every succeeded `ft:` model."""
from pathlib import Path

from fastapi import APIRouter, Request

from trainer.compose import CONFIG_DIR
from trainer.serve.errors import APIError, not_found

router = APIRouter()


def families() -> list[str]:
    """The hosted model families ftlab has configs for (conf/model/)."""
    return sorted(path.stem for path in (Path(CONFIG_DIR) / "model").glob("*.yaml"))


def served_models(server) -> list[dict]:
    """Model objects: families first (owned by the backbone's name), then succeeded ft: models, newest first."""
    from trainer.jobs import scan_jobs

    removed = server.index.removed_models()
    models = [{"id": name, "object": "model", "created": 0, "owned_by": f"ftlab:{server.cfg.backbone.name}"}
              for name in families()]
    for job in scan_jobs(str(server.root)):
        name = job.record.get("fine_tuned_model")
        if job.record.get("status") == "succeeded" and name and name not in removed:
            models.append({"id": name, "object": "model", "created": job.record.get("finished_at") or 0,
                           "owned_by": job.record.get("organization_id") or "personal"})
    return models


@router.get("/models")
def list_models(request: Request) -> dict:
    """GET /v1/models."""
    return {"object": "list", "data": served_models(request.app.state.server)}


@router.get("/models/{model:path}")
def retrieve_model(request: Request, model: str) -> dict:
    """GET /v1/models/{model}: a family or an ft: model (a `/` may arrive as %2F; `:` as it is)."""
    found = next((m for m in served_models(request.app.state.server) if m["id"] == model), None)
    if found is None:
        raise not_found("model", model, "model")
    return found


@router.delete("/models/{model:path}")
def delete_model(request: Request, model: str) -> dict:
    """DELETE /v1/models/{ft:…}: take a fine-tuned model out of service; its job and run dir stay."""
    server = request.app.state.server
    if model in families():
        raise APIError(403, f"{model} is a base model family; only fine-tuned (ft:) models can be deleted",
                       param="model", code="model_not_deletable")
    if not any(m["id"] == model for m in served_models(server)):
        raise not_found("model", model, "model")
    server.index.remove_model(model)
    forget = getattr(server.models, "forget", None)
    if forget is not None:
        forget(model)  # unload its adapter now
    return {"id": model, "object": "model", "deleted": True}
