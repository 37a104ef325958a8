"""Graders, as the hosted fine-tuning API defines them: validate one, and grade model samples with it.

    validate({"type": "string_check", "name": "exact", "input": "{{sample.output_text}}",
              "reference": "{{item.answer}}", "operation": "eq"})
    grade(grader, sample_namespace("Paris"), {"answer": "Paris"}, Settings())   # → Grade(reward=1.0, …)

A grader is a JSON object of one of six types: `string_check`, `text_similarity`, `python`,
`score_model`, `label_model` (the last two judged by a model, through a `judge` callable the caller
gives: ftlab serve's engine, or a training job's), and `multi`, which combines named graders with a
`calculate_output` formula. A problem with a sample (a template naming a missing field, a python
grader that raises or hangs, a judge whose answer holds no score) never raises: the sample scores
0 and the hosted error flag says why, as `metadata.errors` does on the hosted API.
"""
import json
import math
import re
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

from trainer.graders import formula, sandbox, similarity, templates

TYPES = ("string_check", "text_similarity", "python", "score_model", "label_model", "multi")
ERROR_FLAGS = ("formula_parse_error", "invalid_variable_error", "model_grader_parse_error",
               "model_grader_refusal_error", "model_grader_server_error", "other_error", "python_grader_runtime_error",
               "python_grader_server_error", "sample_parse_error", "truncated_observation_error",
               "unresponsive_reward_error")
ROLES = ("user", "assistant", "system", "developer")
MAX_DEPTH = 2  # a multi grader's graders may not be multi graders themselves


class GraderError(ValueError):
    """A grader that is not valid; `param` names the field (`grader.graders.accuracy.operation`)."""

    def __init__(self, message: str, param: str = "grader"):
        super().__init__(message)
        self.param = param


@dataclass
class Settings:
    """What graders may use here: the python sandbox's limits, a local embedding model for `cosine`."""

    python: sandbox.Limits = field(default_factory=sandbox.Limits)
    embedding_model: Optional[str] = None

    @classmethod
    def from_config(cls, graders_cfg) -> "Settings":
        """From the `graders` config group (conf/graders/)."""
        return cls(sandbox.Limits(float(graders_cfg.python_timeout_s), int(graders_cfg.python_memory_mb),
                                  int(graders_cfg.python_disk_mb)), graders_cfg.embedding_model or None)


@dataclass
class JudgeReply:
    """A judge model's answer to a model grader's messages, and the tokens it took."""

    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0


Judge = Callable[[str, list, dict], JudgeReply]  # (model, messages, sampling_params) → reply


@dataclass
class Grade:
    """One sample's grade: the reward, each sub-grader's score, the error flags raised and the judges' tokens."""

    reward: float
    name: str
    type: str
    sub_rewards: dict = field(default_factory=dict)
    errors: dict = field(default_factory=dict)  # flag → True, and *_details / *_type strings
    token_usage: dict = field(default_factory=dict)  # judge model → {prompt_tokens, completion_tokens, total_tokens}
    execution_time: float = 0.0
    sampled_model_name: Optional[str] = None

    def response(self) -> dict:
        """The hosted `graders/run` response."""
        errors = {flag: bool(self.errors.get(flag)) for flag in ERROR_FLAGS}
        errors |= {key: self.errors.get(key) for key in ("python_grader_runtime_error_details",
                                                         "python_grader_server_error_type",
                                                         "model_grader_server_error_details")}
        total = sum(usage["total_tokens"] for usage in self.token_usage.values())
        scores = self.sub_rewards or {self.name: self.reward}
        return {"reward": self.reward, "sub_rewards": self.sub_rewards,
                "model_grader_token_usage_per_model": self.token_usage,
                "metadata": {"name": self.name, "type": self.type, "errors": errors,
                             "execution_time": self.execution_time, "scores": scores,
                             "token_usage": total if self.token_usage else None,
                             "sampled_model_name": self.sampled_model_name}}


# ---- validation ------------------------------------------------------------------------------
def _text(grader: dict, key: str, param: str) -> str:
    value = grader.get(key)
    if not isinstance(value, str):
        raise GraderError(f"{param}.{key} must be a string", f"{param}.{key}")
    try:
        templates.references(value)
    except ValueError as error:
        raise GraderError(f"{param}.{key}: {error}", f"{param}.{key}") from None
    return value


def _messages(grader: dict, param: str) -> list[dict]:
    messages = grader.get("input")
    if not isinstance(messages, list) or not messages:
        raise GraderError(f"{param}.input must be a list of messages", f"{param}.input")
    for index, message in enumerate(messages):
        where = f"{param}.input.[{index}]"
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise GraderError(f"{where}: a message needs a role ({', '.join(ROLES)}) and content", where)
        for text in _content_texts(message.get("content"), where):
            try:
                templates.references(text)
            except ValueError as error:
                raise GraderError(f"{where}.content: {error}", f"{where}.content") from None
    return messages


def _content_texts(content, where: str) -> list[str]:
    """The texts of a message's content (a string, or text parts); images and audio are refused."""
    if isinstance(content, str):
        return [content]
    parts = content if isinstance(content, list) else [content]
    texts = []
    for part in parts:
        if isinstance(part, str):
            texts.append(part)
        elif isinstance(part, dict) and part.get("type") in ("input_text", "output_text", "text") \
                and isinstance(part.get("text"), str):
            texts.append(part["text"])
        else:
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise GraderError(f"{where}.content: only text is supported here, not {kind!r}", f"{where}.content")
    return texts


def sub_graders(grader: dict) -> dict:
    """A multi grader's graders by name: the guides' map, or the SDK's single grader."""
    graders = grader.get("graders")
    if isinstance(graders, dict) and "type" in graders:
        return {graders.get("name"): graders}
    return graders if isinstance(graders, dict) else {}


def validate(grader, param: str = "grader", depth: int = 1, settings: Optional[Settings] = None) -> dict:
    """`grader` if it is a valid hosted grader, else `GraderError` naming the problem and the field. With
    `settings`, also what this machine cannot run (`cosine` without an embedding model)."""
    if not isinstance(grader, dict):
        raise GraderError(f"{param} must be a grader object with a type ({', '.join(TYPES)})", param)
    kind = grader.get("type")
    if kind not in TYPES:
        raise GraderError(f"{param}.type must be one of {', '.join(TYPES)}, not {kind!r}", f"{param}.type")
    if not isinstance(grader.get("name"), str) or not grader["name"]:
        raise GraderError(f"{param}.name must be a non-empty string", f"{param}.name")
    if kind == "string_check":
        _text(grader, "input", param), _text(grader, "reference", param)
        if grader.get("operation") not in similarity.OPERATIONS:
            raise GraderError(f"{param}.operation must be one of {', '.join(similarity.OPERATIONS)}, not "
                              f"{grader.get('operation')!r}", f"{param}.operation")
    elif kind == "text_similarity":
        _text(grader, "input", param), _text(grader, "reference", param)
        metric = grader.get("evaluation_metric")
        if metric not in similarity.METRICS:
            raise GraderError(f"{param}.evaluation_metric must be one of {', '.join(similarity.METRICS)}, not "
                              f"{metric!r}", f"{param}.evaluation_metric")
        if metric == "cosine" and settings is not None and not settings.embedding_model:
            raise GraderError(f"{param}.evaluation_metric cosine needs an embedding model, and this server has none: "
                              "set graders.embedding_model to a local model folder, or use another metric",
                              f"{param}.evaluation_metric")
    elif kind == "python":
        try:
            sandbox.check_source(grader.get("source"))
        except ValueError as error:
            raise GraderError(f"{param}.source: {error}", f"{param}.source") from None
    elif kind in ("score_model", "label_model"):
        if not isinstance(grader.get("model"), str) or not grader["model"]:
            raise GraderError(f"{param}.model must name the judge model (a family or an ft: model)", f"{param}.model")
        _messages(grader, param)
        if kind == "score_model":
            bounds = grader.get("range", [0, 1])
            if not (isinstance(bounds, list) and len(bounds) == 2 and all(
                    isinstance(b, (int, float)) and not isinstance(b, bool) and math.isfinite(b) for b in bounds)
                    and bounds[0] < bounds[1]):
                raise GraderError(f"{param}.range must be two numbers, low then high", f"{param}.range")
        else:
            labels, passing = grader.get("labels"), grader.get("passing_labels")
            if not (isinstance(labels, list) and labels and all(isinstance(label, str) and label for label in labels)):
                raise GraderError(f"{param}.labels must be a list of labels", f"{param}.labels")
            if not (isinstance(passing, list) and passing and set(passing) <= set(labels)):
                raise GraderError(f"{param}.passing_labels must be a non-empty subset of labels",
                                  f"{param}.passing_labels")
    else:  # multi
        if depth >= MAX_DEPTH:
            raise GraderError(f"{param}: a multi grader's graders cannot be multi graders", f"{param}.type")
        named = sub_graders(grader)
        if not named:
            raise GraderError(f"{param}.graders must map names to graders", f"{param}.graders")
        for name, sub in named.items():
            if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
                raise GraderError(f"{param}.graders: {name!r} cannot be used in a formula; name graders with "
                                  "letters, digits and _", f"{param}.graders")
            validate(sub, f"{param}.graders.{name}", depth + 1, settings)
        try:
            formula.parse(grader.get("calculate_output"), set(named))
        except formula.FormulaError as error:
            raise GraderError(f"{param}.{error}", f"{param}.calculate_output") from None
    return grader


def item_fields(grader: dict) -> set[str]:
    """The top-level item fields a grader's templates read (each line of the data must have them)."""
    texts = []
    for node in [grader, *sub_graders(grader).values()] if grader.get("type") == "multi" else [grader]:
        texts += [node.get(key) for key in ("input", "reference") if isinstance(node.get(key), str)]
        for message in node.get("input") if isinstance(node.get("input"), list) else []:
            texts += _content_texts(message.get("content"), "")
    return {path[0] for text in texts for namespace, path in templates.references(text)
            if namespace == "item" and isinstance(path[0], str)}


# ---- grading ---------------------------------------------------------------------------------
def grade(grader: dict, sample: dict, item: dict, settings: Settings = Settings(),
          judge: Optional[Judge] = None) -> Grade:
    """One sample's grade (`sample`: `templates.sample_namespace(...)`; `item`: the data line's fields)."""
    return grade_many(grader, [(sample, item)], settings, judge)[0]


def grade_many(grader: dict, pairs: list[tuple[dict, dict]], settings: Settings = Settings(),
               judge: Optional[Judge] = None) -> list[Grade]:
    """Every (sample, item) graded; a python grader runs them all in one sandboxed process."""
    started = time.perf_counter()
    named = sub_graders(grader) if grader["type"] == "multi" else {grader["name"]: grader}
    scores = {name: _score_all(sub, pairs, settings, judge) for name, sub in named.items()}
    grades = []
    for index in range(len(pairs)):
        parts = {name: outcomes[index] for name, outcomes in scores.items()}
        errors, usage = {}, {}
        for outcome in parts.values():
            errors |= outcome.errors
            for model, tokens in outcome.usage.items():
                total = usage.setdefault(model, {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0})
                for key in total:
                    total[key] += tokens[key]
        sub_rewards = {}
        if grader["type"] == "multi":
            sub_rewards = {name: outcome.score for name, outcome in parts.items()}
            try:
                reward = formula.evaluate(grader["calculate_output"], sub_rewards)
            except formula.FormulaError:
                reward, errors = 0.0, errors | {"formula_parse_error": True}
        else:
            reward = next(iter(parts.values())).score
        judges = [sub.get("model") for sub in named.values() if sub["type"] in ("score_model", "label_model")]
        grades.append(Grade(reward, grader["name"], grader["type"], sub_rewards, errors, usage,
                            (time.perf_counter() - started) / max(len(pairs), 1), judges[0] if judges else None))
    return grades


@dataclass
class _Outcome:
    score: float = 0.0
    errors: dict = field(default_factory=dict)
    usage: dict = field(default_factory=dict)


def _render(text: str, sample: dict, item: dict) -> tuple[Optional[str], dict]:
    """The template filled in, or (None, the error flag) when it names a value that is not there."""
    try:
        return templates.render(text, {"sample": sample, "item": item}), {}
    except templates.MissingVariable as missing:
        flag = "sample_parse_error" if str(missing).strip("'").startswith("sample.") else "invalid_variable_error"
        return None, {flag: True}


def _score_all(grader: dict, pairs, settings: Settings, judge: Optional[Judge]) -> list[_Outcome]:
    kind = grader["type"]
    if kind == "python":
        results = sandbox.run_python(grader["source"], [(sample, item) for sample, item in pairs], settings.python)
        return [_Outcome(result.score) if result.error is None else _Outcome(0.0, {
            f"python_grader_{result.error}_error": True,
            ("python_grader_runtime_error_details" if result.error == "runtime" else "python_grader_server_error_type"):
                result.details}) for result in results]
    return [_score_one(grader, sample, item, settings, judge) for sample, item in pairs]


def _score_one(grader: dict, sample: dict, item: dict, settings: Settings, judge: Optional[Judge]) -> _Outcome:
    kind = grader["type"]
    if kind in ("string_check", "text_similarity"):
        text, errors = _render(grader["input"], sample, item)
        reference, more = _render(grader["reference"], sample, item)
        if text is None or reference is None:
            return _Outcome(0.0, errors | more)
        if kind == "string_check":
            return _Outcome(similarity.string_check(grader["operation"], text, reference))
        try:
            return _Outcome(similarity.similarity(grader["evaluation_metric"], text, reference,
                                                  settings.embedding_model))
        except ValueError:  # cosine without an embedding model (validate refuses it where settings are known)
            return _Outcome(0.0, {"other_error": True})
    return _judged(grader, sample, item, judge)


def _judged(grader: dict, sample: dict, item: dict, judge: Optional[Judge]) -> _Outcome:
    """A score_model or label_model grade: the messages filled in, the judge's answer read back."""
    messages = []
    for message in grader["input"]:
        texts = []
        for text in _content_texts(message.get("content"), "input"):
            rendered, errors = _render(text, sample, item)
            if rendered is None:
                return _Outcome(0.0, errors)
            texts.append(rendered)
        messages.append({"role": "system" if message["role"] == "developer" else message["role"],
                         "content": "".join(texts)})
    if judge is None:
        return _Outcome(0.0, {"model_grader_server_error": True,
                              "model_grader_server_error_details": "no model is available to judge here"})
    try:
        reply = judge(grader["model"], messages, grader.get("sampling_params") or {})
    except Exception as error:  # noqa: BLE001 - a judge that fails scores 0 with the hosted flag
        return _Outcome(0.0, {"model_grader_server_error": True, "model_grader_server_error_details": str(error)})
    usage = {grader["model"]: {"prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.completion_tokens,
                               "total_tokens": reply.prompt_tokens + reply.completion_tokens}}
    score = read_score(reply.text, grader) if grader["type"] == "score_model" else read_label(reply.text, grader)
    if score is None:
        return _Outcome(0.0, {"model_grader_parse_error": True}, usage)
    return _Outcome(score, {}, usage)


NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def read_score(text: str, grader: dict) -> Optional[float]:
    """A score_model judge's score: `{"result": x}` if it answered JSON, else the first number; clipped to
    `range` (default [0, 1]); None when the answer holds no number."""
    low, high = grader.get("range", [0, 1])
    try:
        value = json.loads(text.strip()).get("result")
    except (ValueError, AttributeError):
        value = None
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        match = NUMBER.search(text)
        value = float(match.group()) if match else None
    return None if value is None else min(max(float(value), low), high)


def read_label(text: str, grader: dict) -> Optional[float]:
    """A label_model judge's verdict: 1.0 if the label it answered is a passing one, else 0.0; None when it
    answered none of the labels. The whole answer may be a label, or the first label it names."""
    answer = text.strip().strip(".\"'").casefold()
    labels = grader["labels"]
    chosen = next((label for label in labels if label.casefold() == answer), None)
    if chosen is None:
        found = [(match.start(), label) for label in labels
                 for match in [re.search(rf"\b{re.escape(label.casefold())}\b", text.casefold())] if match]
        chosen = min(found)[1] if found else None
    return None if chosen is None else float(chosen in grader["passing_labels"])
