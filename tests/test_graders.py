"""Graders (trainer.graders) as the hosted API defines them: each type's scores, templates, the python
sandbox (no secrets, no hang, no crash of the caller), the multi grader's safe formula, validation
errors that name the field, the graders API through the official client, and `ftlab grade`."""
import json
import os
import subprocess
import sys
import time

import openai
import pytest
from openai import OpenAI

from tests.conftest import REPO, write_jsonl
from tests.live_server import live_server
from trainer.graders import GraderError, JudgeReply, Limits, Settings, grade, grade_many, item_fields, validate
from trainer.graders import sample_namespace as sample

EXACT = {"type": "string_check", "name": "exact", "input": "{{sample.output_text}}", "reference": "{{item.answer}}",
         "operation": "eq"}
SHORT = {"type": "python", "name": "short",
         "source": "def grade(sample, item):\n    return 1.0 if len(sample['output_text'].split()) <= 3 else 0.2\n"}
MULTI = {"type": "multi", "name": "both", "graders": {"exact": EXACT, "short": SHORT},
         "calculate_output": "0.7 * exact + 0.3 * short"}


def with_(grader: dict, **changes) -> dict:
    return grader | changes


@pytest.mark.parametrize("operation, text, reference, expected", [
    ("eq", "Paris", "Paris", 1.0), ("eq", "paris", "Paris", 0.0), ("ne", "Lyon", "Paris", 1.0),
    ("like", "It is Paris.", "Paris", 1.0), ("like", "It is PARIS.", "Paris", 0.0),
    ("ilike", "It is PARIS.", "paris", 1.0), ("ilike", "Lyon", "paris", 0.0)])
def test_string_check_as_the_hosted_guide_defines_it(operation, text, reference, expected):
    grader = with_(EXACT, operation=operation)
    assert grade(grader, sample(text), {"answer": reference}).reward == expected


def test_text_similarity_metrics_score_within_zero_and_one():
    reference = "The cat sat on the mat."
    for metric in ("fuzzy_match", "bleu", "gleu", "meteor", "rouge_1", "rouge_2", "rouge_3", "rouge_4", "rouge_5",
                   "rouge_l"):
        grader = {"type": "text_similarity", "name": metric, "input": "{{sample.output_text}}",
                  "reference": "{{item.answer}}", "evaluation_metric": metric}
        same = grade(grader, sample(reference), {"answer": reference}).reward
        near = grade(grader, sample("A cat sat on a mat"), {"answer": reference}).reward
        far = grade(grader, sample("Quantum chromodynamics"), {"answer": reference}).reward
        assert same == pytest.approx(1.0, abs=0.002) and far <= near < same, metric
    cosine = {"type": "text_similarity", "name": "c", "input": "x", "reference": "y", "evaluation_metric": "cosine"}
    with pytest.raises(GraderError, match="graders.embedding_model") as refused:
        validate(cosine, settings=Settings())
    assert refused.value.param == "grader.evaluation_metric"


def test_templates_read_json_and_tools_and_missing_values_raise_the_hosted_flags():
    city = with_(EXACT, input="{{sample.output_json.city}}", reference="{{item.meta.cities[0]}}")
    assert grade(city, sample('{"city": "Porto"}'), {"meta": {"cities": ["Porto"]}}).reward == 1.0
    not_json = grade(city, sample("Porto"), {"meta": {"cities": ["Porto"]}})
    assert not_json.reward == 0.0 and not_json.errors == {"sample_parse_error": True}
    missing = grade(EXACT, sample("Porto"), {"other": 1})
    assert missing.reward == 0.0 and missing.response()["metadata"]["errors"]["invalid_variable_error"] is True
    tools = with_(EXACT, input="{{sample.output_tools[0].function.name}}", reference="get_weather")
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
    assert grade(tools, sample("", [call]), {}).reward == 1.0
    assert item_fields(MULTI) == {"answer"}


def test_a_python_grader_reads_no_secret_and_neither_a_hang_nor_a_crash_stops_the_caller(monkeypatch):
    monkeypatch.setenv("FTLAB_API_KEY", "sk-secret")
    source = """
import os, time
def grade(sample, item):
    mode = item["mode"]
    if mode == "secret": return float(len(os.environ.get("FTLAB_API_KEY", "")) + len(os.environ))
    if mode == "hang": time.sleep(60)
    if mode == "raise": raise ValueError("bad sample")
    if mode == "memory": return float(len(bytearray(4 << 30)))
    if mode == "exit": os._exit(3)
    if mode == "text": return "high"
    print("a grader's own output does not disturb the protocol")
    return 0.25
"""
    grader = {"type": "python", "name": "p", "source": source}
    modes = ["ok", "secret", "hang", "ok", "raise", "memory", "exit", "text", "ok"]
    started = time.time()
    results = grade_many(grader, [(sample("x"), {"mode": mode}) for mode in modes],
                         Settings(python=Limits(timeout_s=2, memory_mb=1024)))
    assert time.time() - started < 20
    by_mode = dict(zip(modes, results))
    assert [results[i].reward for i in (0, 3, 8)] == [0.25] * 3 and not any(results[i].errors for i in (0, 3, 8))
    assert by_mode["secret"].errors == {} and by_mode["secret"].reward < 10  # no key; HOME, PATH, thread counts
    assert by_mode["hang"].errors["python_grader_server_error"] and "timeout" in \
        by_mode["hang"].errors["python_grader_server_error_type"]
    assert by_mode["raise"].errors["python_grader_runtime_error"] and "ValueError: bad sample" in \
        by_mode["raise"].errors["python_grader_runtime_error_details"]
    assert by_mode["memory"].errors.get("python_grader_runtime_error") or \
        by_mode["memory"].errors.get("python_grader_server_error")
    assert by_mode["exit"].errors["python_grader_server_error"]
    assert "not a finite number" in by_mode["text"].errors["python_grader_runtime_error_details"]
    assert all(r.reward == 0.0 for r in results if r.errors)


def test_a_multi_grader_combines_its_graders_with_the_safe_formula():
    result = grade(MULTI, sample("Paris"), {"answer": "Paris"})
    assert result.reward == pytest.approx(1.0) and result.sub_rewards == {"exact": 1.0, "short": 1.0}
    result = grade(MULTI, sample("It is surely Lyon"), {"answer": "Paris"})
    assert result.reward == pytest.approx(0.3 * 0.2)
    powered = with_(MULTI, calculate_output="max(exact, short) ^ 2 + floor(sqrt(4)) - abs(-1) + log(exp(0))")
    assert grade(powered, sample("Paris"), {"answer": "Paris"}).reward == pytest.approx(2.0)
    divided = with_(MULTI, calculate_output="exact / short - 1")  # 0 / 0.2 - 1: fine; 1 / 0 below is not
    assert grade(divided, sample("It is surely Lyon"), {"answer": "Paris"}).reward == pytest.approx(-1.0)
    zero = grade(with_(MULTI, calculate_output="short / exact"), sample("no"), {"answer": "Paris"})
    assert zero.reward == 0.0 and zero.errors == {"formula_parse_error": True}


@pytest.mark.parametrize("grader, param", [
    ({"type": "string_check"}, "grader.name"),
    (with_(EXACT, operation="contains"), "grader.operation"),
    (with_(EXACT, reference="{{items.answer}}"), "grader.reference"),
    (with_(EXACT, input="{{sample.text}}"), "grader.input"),
    ({"type": "python", "name": "p", "source": "def score(sample, item):\n    return 1\n"}, "grader.source"),
    ({"type": "python", "name": "p", "source": "def grade(:"}, "grader.source"),
    (with_(MULTI, calculate_output="exact + unknown"), "grader.calculate_output"),
    (with_(MULTI, calculate_output="__import__('os').system('id')"), "grader.calculate_output"),
    (with_(MULTI, calculate_output="exact.real"), "grader.calculate_output"),
    (with_(MULTI, graders={"inner": MULTI}), "grader.graders.inner.type"),
    ({"type": "text_similarity", "name": "t", "input": "a", "reference": "b", "evaluation_metric": "bertscore"},
     "grader.evaluation_metric"),
    ({"type": "label_model", "name": "l", "model": "gpt-3.5-turbo", "input": [{"role": "user", "content": "x"}],
      "labels": ["good", "bad"], "passing_labels": ["great"]}, "grader.passing_labels"),
    ({"type": "score_model", "name": "s", "model": "gpt-3.5-turbo", "input": [{"role": "user", "content": "x"}],
      "range": [1, 0]}, "grader.range"),
    ({"type": "score_model", "name": "s", "model": "gpt-3.5-turbo",
      "input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x"}]}]},
     "grader.input.[0].content"),
])
def test_validation_refuses_and_names_the_field(grader, param):
    with pytest.raises(GraderError) as refused:
        validate(grader)
    assert refused.value.param == param


def test_model_graders_read_the_judges_answer():
    score = {"type": "score_model", "name": "judge", "model": "gpt-3.5-turbo", "range": [0, 10],
             "input": [{"role": "system", "content": "Rate the answer."},
                       {"role": "user", "content": "Q: {{item.question}} A: {{sample.output_text}}"}]}
    seen = []

    def judge(answer):
        def reply(model, messages, params):
            seen.append(messages)
            return JudgeReply(answer, 20, 3)
        return reply

    assert grade(score, sample("Paris"), {"question": "Capital?"}, judge=judge('{"result": 8.5}')).reward == 8.5
    assert seen[-1][1]["content"] == "Q: Capital? A: Paris"
    assert grade(score, sample("x"), {"question": "q"}, judge=judge("I'd give it 12 out of 10")).reward == 10
    unreadable = grade(score, sample("x"), {"question": "q"}, judge=judge("no idea"))
    assert unreadable.reward == 0 and unreadable.errors == {"model_grader_parse_error": True}
    assert unreadable.token_usage == {"gpt-3.5-turbo": {"prompt_tokens": 20, "completion_tokens": 3, "total_tokens": 23}}
    label = {"type": "label_model", "name": "l", "model": "gpt-3.5-turbo", "input": [{"role": "user", "content": "?"}],
             "labels": ["correct", "incorrect"], "passing_labels": ["correct"]}
    assert grade(label, sample("x"), {}, judge=judge("Correct.")).reward == 1.0
    assert grade(label, sample("x"), {}, judge=judge("The answer is incorrect, sadly")).reward == 0.0
    assert grade(label, sample("x"), {}).errors["model_grader_server_error"]  # no judge at hand


@pytest.fixture
def server_url(tmp_path, cache_dir):
    overrides = ["backbone=tiny-llama", "logger=none", "train.device=cpu", "train.precision=fp32",
                 f"cache_dir={cache_dir}", "graders.python_timeout_s=3"]
    with live_server(tmp_path / "root", overrides) as (url, _):
        yield url


def test_the_graders_api_through_the_official_client(server_url):
    client = OpenAI(base_url=server_url, api_key="x", max_retries=0)
    assert client.fine_tuning.alpha.graders.validate(grader=MULTI).grader.type == "multi"
    result = client.fine_tuning.alpha.graders.run(grader=MULTI, model_sample="Paris", item={"answer": "Paris"})
    assert result.reward == pytest.approx(1.0) and result.sub_rewards == {"exact": 1.0, "short": 1.0}
    assert result.metadata.name == "both" and result.metadata.type == "multi"
    assert not any(value for key, value in result.metadata.errors.model_dump().items() if isinstance(value, bool))
    hang = {"type": "python", "name": "h", "source": "import time\ndef grade(sample, item):\n    time.sleep(60)\n"}
    started = time.time()
    stuck = client.fine_tuning.alpha.graders.run(grader=hang, model_sample="x")
    assert time.time() - started < 15 and stuck.reward == 0 and stuck.metadata.errors.python_grader_server_error
    judged = {"type": "score_model", "name": "j", "model": "gpt-3.5-turbo", "range": [0, 1],
              "input": [{"role": "user", "content": "Rate {{sample.output_text}} from 0 to 1."}],
              "sampling_params": {"max_completions_tokens": 4}}
    scored = client.fine_tuning.alpha.graders.run(grader=judged, model_sample="Paris")
    assert scored.metadata.sampled_model_name == "gpt-3.5-turbo" and "gpt-3.5-turbo" in \
        scored.model_grader_token_usage_per_model  # the tiny random judge rarely writes a number: no flag asserted
    with pytest.raises(openai.BadRequestError) as refused:
        client.fine_tuning.alpha.graders.run(grader=with_(MULTI, calculate_output="exact + os"), model_sample="x")
    assert refused.value.body["param"] == "grader.calculate_output" and refused.value.body["code"] == "invalid_grader"
    with pytest.raises(openai.BadRequestError):
        client.fine_tuning.alpha.graders.validate(grader={"type": "python", "name": "p", "source": "x = 1"})


def test_ftlab_grade_runs_a_grader_over_a_file(tmp_path, cache_dir):
    grader = tmp_path / "grader.json"
    grader.write_text(json.dumps(MULTI))
    samples = write_jsonl(tmp_path / "samples.jsonl", [{"sample": "Paris", "item": {"answer": "Paris"}},
                                                       {"sample": {"output_text": "Lyon is nice"},
                                                        "item": {"answer": "Paris"}}])
    env = dict(os.environ, PYTHONPATH=str(REPO))
    run = subprocess.run([sys.executable, "-m", "trainer", "grade", f"grader={grader}", f"samples={samples}",
                          "logger=none", f"cache_dir={cache_dir}"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "mean reward 0.6500 over 2 samples; 0 with errors" in run.stdout
    broken = write_jsonl(tmp_path / "broken.jsonl", [{"sample": "Paris", "item": "not an object"}])
    run = subprocess.run([sys.executable, "-m", "trainer", "grade", f"grader={grader}", f"samples={broken}"],
                         capture_output=True, text=True, env=env, cwd=tmp_path)
    assert run.returncode == 2 and f"{broken}:1" in run.stderr and "must be an object" in run.stderr
