"""`/v1/fine_tuning/alpha/graders/run` and `/validate`: try a grader before training with it.

    client.fine_tuning.alpha.graders.validate(grader={...})
    client.fine_tuning.alpha.graders.run(grader={...}, model_sample="Paris", item={"answer": "Paris"})

The grader library (`trainer.graders`) grades; model graders are judged by the models this server
serves (a family or any `ft:` model), through the same engine as chat completions. A grader that
is not valid is a 400 naming the field; a sample that cannot be graded scores 0 with the hosted
error flags in `metadata.errors`, as on the hosted API.
"""
from typing import Any, Optional

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from trainer.serve.errors import APIError

router = APIRouter()


class ValidateBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    grader: Any


class RunBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    grader: Any
    model_sample: str = Field(max_length=1_000_000)
    item: Optional[Any] = None


def checked(request: Request, grader) -> dict:
    """The grader, valid for this server (its graders settings), or a 400 naming the problem."""
    from trainer.graders import GraderError, Settings, validate

    try:
        return validate(grader, settings=Settings.from_config(request.app.state.server.cfg.graders))
    except GraderError as error:
        raise APIError(400, str(error), param=error.param, code="invalid_grader") from None


@router.post("/fine_tuning/alpha/graders/validate")
def validate_grader(body: ValidateBody, request: Request) -> dict:
    """POST …/graders/validate: the grader, back, when it is valid."""
    return {"grader": checked(request, body.grader)}


@router.post("/fine_tuning/alpha/graders/run")
async def run_grader(body: RunBody, request: Request) -> dict:
    """POST …/graders/run: the grader's reward for one model sample (and dataset item)."""
    from trainer.graders import Settings, grade, sample_namespace

    grader = checked(request, body.grader)
    if body.item is not None and not isinstance(body.item, dict):
        raise APIError(400, "item must be a JSON object (the dataset line's fields)", param="item",
                       code="invalid_value")
    server = request.app.state.server

    def judge(model: str, messages: list, sampling_params: dict):
        if server.index.model_removed(model):
            raise LookupError(f"The model {model} does not exist")
        return server.models.judge(model, messages, sampling_params)

    result = await run_in_threadpool(grade, grader, sample_namespace(body.model_sample), body.item or {},
                                     Settings.from_config(server.cfg.graders), judge)
    return result.response()
