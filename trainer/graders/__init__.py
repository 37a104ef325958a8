"""Graders: the hosted fine-tuning API's reward functions, as a library (`graders.py` validates and grades;
`templates.py`, `similarity.py`, `formula.py` and `sandbox.py` are its parts).

`ftlab serve` runs them at `POST /v1/fine_tuning/alpha/graders/run` and `/validate`, `ftlab grade`
over a JSONL file, and reinforcement fine-tuning on every sampled answer.
"""
from trainer.graders.graders import (
    ERROR_FLAGS,
    TYPES,
    Grade,
    GraderError,
    JudgeReply,
    Settings,
    grade,
    grade_many,
    item_fields,
    sub_graders,
    validate,
)
from trainer.graders.sandbox import Limits
from trainer.graders.templates import sample_namespace

__all__ = ["ERROR_FLAGS", "TYPES", "Grade", "GraderError", "JudgeReply", "Limits", "Settings", "grade", "grade_many",
           "item_fields", "sample_namespace", "sub_graders", "validate"]
