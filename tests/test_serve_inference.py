"""`ftlab serve`'s chat/completions, driven by the official openai client on the tiny Llama: families,
ft: models and checkpoints, streaming == plain text, usage, n, seed, stop, length, errors, concurrent
requests to different adapters, LRU eviction, and a client that leaves mid-stream."""
import concurrent.futures
import json
import shutil
import time
from pathlib import Path

import openai
import pytest
from omegaconf import OmegaConf
from openai import OpenAI

from tests.conftest import chat_example, write_jsonl
from tests.live_server import live_server
from trainer.schema import register_configs

MESSAGES = [{"role": "system", "content": "Reply briefly."}, {"role": "user", "content": "Q3"}]
PROMPT = "Ticket 99: charged twice\n\n###\n\n"


def _train(cache_dir: str, run_dir: Path, rows: list, *overrides: str) -> str:
    """A 4-step job (its epochs' checkpoints at 3 and 4, a resume checkpoint at 2) with a high learning rate, so
    adapters answer differently."""
    from tests.test_chat import compose_cfg
    from trainer.train import run_training

    train = write_jsonl(run_dir.parent / f"{run_dir.name}.jsonl", rows)
    cfg = compose_cfg(cache_dir, "data=custom", f"data.train_file={train}", "data.validation_file=null",
                      "moderation=off", "train.max_steps=4", "train.batch_size=4", "train.checkpoint_every=2",
                      "train.learning_rate_multiplier=100", *overrides)
    assert run_training(cfg, run_dir) == 0
    (run_dir / ".hydra").mkdir()
    OmegaConf.save(OmegaConf.to_container(cfg, enum_to_str=True), run_dir / ".hydra" / "config.yaml")
    return json.loads((run_dir / "job.json").read_text())["fine_tuned_model"]


@pytest.fixture(scope="module")
def jobs(tmp_path_factory, cache_dir):
    """A jobs root with two chat jobs (different answers) and a babbage-002 prompt/completion job."""
    register_configs()
    root = tmp_path_factory.mktemp("serve-inference") / "root"
    trained = root / "trained"
    trained.mkdir(parents=True)
    names = {
        "a": _train(cache_dir, trained / "a", [chat_example(f"Q{i}", "alpha alpha alpha") for i in range(12)]),
        "b": _train(cache_dir, trained / "b", [chat_example(f"Q{i}", "beta beta beta") for i in range(12)]),
        "c": _train(cache_dir, trained / "c", [{"prompt": f"Ticket {i}: charged twice\n\n###\n\n",
                                                "completion": " billing\n"} for i in range(12)], "model=babbage-002"),
    }
    return root, names


def _overrides(cache_dir: str, *extra: str) -> list[str]:
    return ["backbone=tiny-llama", "logger=none", "train.device=cpu", "train.precision=fp32", f"cache_dir={cache_dir}",
            "moderation=off", *extra]


@pytest.fixture(scope="module")
def served(jobs, cache_dir):
    root, names = jobs
    with live_server(root, _overrides(cache_dir)) as (url, server):
        yield OpenAI(base_url=url, api_key="x", max_retries=0, timeout=60), server, names


def chat(client, model, **kwargs):
    kwargs = {"messages": MESSAGES, "temperature": 0, "max_tokens": 10} | kwargs
    return client.chat.completions.create(model=model, **kwargs)


def complete(client, model, **kwargs):
    kwargs = {"prompt": PROMPT, "temperature": 0, "max_tokens": 6} | kwargs
    return client.completions.create(model=model, **kwargs)


def streamed(stream) -> tuple[str, list]:
    chunks = list(stream)
    text = "".join((c.choices[0].delta.content if hasattr(c.choices[0], "delta") else c.choices[0].text) or ""
                   for c in chunks if c.choices)
    return text, chunks


def test_chat_on_a_family_an_ft_model_and_a_checkpoint(served):
    from trainer.inference import encode_chat_prompt, generate_batch, load_model
    from trainer.jobs import load_job_config, resolve_job

    client, server, names = served
    answers = {}
    for model in ["gpt-3.5-turbo", names["a"], f"{names['a']}:ckpt-step-4", f"{names['a']}:ckpt-step-3", names["b"]]:
        reply = chat(client, model)
        assert reply.id.startswith("chatcmpl-") and reply.object == "chat.completion" and reply.model == model
        choice = reply.choices[0]
        assert choice.index == 0 and choice.message.role == "assistant" and choice.logprobs is None
        assert choice.finish_reason in ("length", "stop") and reply.created > 0
        assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
        answers[model] = choice.message.content
    # the last checkpoint is the final adapter; the adapters and the bare backbone answer differently
    assert answers[names["a"]] == answers[f"{names['a']}:ckpt-step-4"]
    assert len({answers["gpt-3.5-turbo"], answers[names["a"]], answers[names["b"]]}) == 3
    # the same prompt tokens and the same greedy reply as `ftlab chat` (transformers' generate) on the job
    job = resolve_job(names["a"], str(server.root))
    loaded = load_model(load_job_config(job), job)
    ids = encode_chat_prompt(loaded.tokenizer, MESSAGES)
    reference = generate_batch(loaded, [ids], max_new_tokens=10)[0]
    reply = chat(client, names["a"])
    assert reply.usage.prompt_tokens == len(ids) and reply.usage.completion_tokens == reference["n_tokens"]
    assert reply.choices[0].message.content == reference["text"]


def test_streaming_is_the_plain_reply_token_for_token(served):
    client, _, names = served
    for model, stop in [(names["a"], None), (names["b"], None), ("gpt-3.5-turbo", None), (names["a"], ["ph"])]:
        plain = chat(client, model, max_tokens=16, stop=stop)
        text, chunks = streamed(chat(client, model, max_tokens=16, stop=stop, stream=True,
                                     stream_options={"include_usage": True}))
        assert text == plain.choices[0].message.content
        assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].delta.content == ""
        assert all(c.id == chunks[0].id and c.id.startswith("chatcmpl-") and c.object == "chat.completion.chunk"
                   for c in chunks)
        last = chunks[-2].choices[0]
        assert last.finish_reason == plain.choices[0].finish_reason and not last.delta.content
        assert chunks[-1].choices == [] and chunks[-1].usage == plain.usage
    # without include_usage: no usage chunk
    text, chunks = streamed(chat(client, names["b"], stream=True))
    assert chunks[-1].choices and chunks[-1].choices[0].finish_reason and all(c.usage is None for c in chunks)
    for prompt in [PROMPT, "hello"]:
        plain = complete(client, names["c"], prompt=prompt, max_tokens=12)
        text, chunks = streamed(complete(client, names["c"], prompt=prompt, max_tokens=12, stream=True,
                                         stream_options={"include_usage": True}))
        assert text == plain.choices[0].text and chunks[-1].usage == plain.usage
        assert chunks[-2].choices[0].finish_reason == plain.choices[0].finish_reason


def test_completions_on_a_family_and_an_ft_model(served):
    client, _, names = served
    for model in ["babbage-002", "davinci-002", names["c"]]:
        reply = complete(client, model)
        assert reply.id.startswith("cmpl-") and reply.object == "text_completion" and reply.model == model
        assert reply.choices[0].index == 0 and reply.choices[0].logprobs is None
        assert reply.usage.completion_tokens <= 6 and reply.usage.prompt_tokens > 0
    several = complete(client, names["c"], prompt=[PROMPT, "hello"], n=2)
    assert [c.index for c in several.choices] == [0, 1, 2, 3]
    assert several.choices[0].text == several.choices[1].text == complete(client, names["c"]).choices[0].text


def test_n_seed_stop_and_length(served):
    client, _, names = served
    model = names["a"]
    two = chat(client, model, n=2, temperature=1, seed=7, max_tokens=12)
    assert [c.index for c in two.choices] == [0, 1]
    again = chat(client, model, n=2, temperature=1, seed=7, max_tokens=12)
    assert [c.message.content for c in again.choices] == [c.message.content for c in two.choices]
    assert two.usage.completion_tokens > 0
    others = {chat(client, model, temperature=1, seed=seed, max_tokens=12).choices[0].message.content
              for seed in (1, 2, 3)}
    assert len(others) > 1
    streamed_text, _ = streamed(chat(client, model, temperature=1, seed=7, max_tokens=12, stream=True))
    assert streamed_text == chat(client, model, temperature=1, seed=7, max_tokens=12).choices[0].message.content
    # max_tokens: finish_reason length with exactly that many tokens
    long = chat(client, names["b"], max_tokens=5)
    assert long.choices[0].finish_reason == "length" and long.usage.completion_tokens == 5
    assert chat(client, names["b"], max_completion_tokens=3).usage.completion_tokens == 3
    # a stop string cuts the reply before it, in both paths
    full = chat(client, names["b"], max_tokens=16).choices[0].message.content
    stop = full[3:5]
    cut = chat(client, names["b"], max_tokens=16, stop=[stop, "never-there"])
    assert cut.choices[0].message.content == full[: full.index(stop)] and cut.choices[0].finish_reason == "stop"
    assert streamed(chat(client, names["b"], max_tokens=16, stop=stop, stream=True))[0] == full[: full.index(stop)]


def test_errors_are_the_hosted_ones(served):
    client, _, names = served
    with pytest.raises(openai.NotFoundError) as error:
        chat(client, "ft:gpt-3.5-turbo:personal::nosuchjob")
    assert error.value.body["code"] == "model_not_found" and error.value.body["param"] == "model"
    for model in ["gpt-4o", names["a"] + ":ckpt-step-2", "latest"]:  # step 2: a resume checkpoint, not a model
        with pytest.raises(openai.NotFoundError):
            chat(client, model)
    with pytest.raises(openai.BadRequestError, match="v1/completions"):
        chat(client, names["c"])
    with pytest.raises(openai.BadRequestError, match="v1/chat/completions"):
        complete(client, names["a"])
    with pytest.raises(openai.BadRequestError, match="v1/chat/completions"):
        complete(client, "gpt-3.5-turbo")
    for bad in [dict(n=9), dict(max_tokens=0), dict(temperature=3), dict(messages=[]),
                dict(stop=["a", "b", "c", "d", "e"]), dict(max_tokens=5000),
                dict(extra_body={"temperature": "hot"}), dict(messages=[{"role": "wizard", "content": "hi"}])]:
        with pytest.raises(openai.BadRequestError) as error:
            chat(client, names["a"], **bad)
        assert "Traceback" not in str(error.value.body)
    with pytest.raises(openai.BadRequestError) as error:
        chat(client, names["a"], messages=[{"role": "user", "content": "x " * 5000}])
    assert error.value.body["code"] == "context_length_exceeded"
    # fields the hosted API knows and ftlab does not use are accepted
    reply = chat(client, names["a"], user="me", logit_bias={}, extra_body={"unknown_field": 1},
                 messages=[{"role": "developer", "content": [{"type": "text", "text": "Reply briefly."}]},
                           {"role": "user", "content": "Q3"}])
    assert reply.choices[0].message.content == chat(client, names["a"]).choices[0].message.content


def test_concurrent_requests_each_get_their_own_model(served):
    client, _, names = served
    calls = [("chat", names["a"], False), ("chat", names["b"], True), ("chat", "gpt-3.5-turbo", False),
             ("complete", names["c"], True), ("chat", f"{names['a']}:ckpt-step-3", True), ("complete", "babbage-002", False)]

    def run(call):
        kind, model, stream = call
        if kind == "chat":
            result = chat(client, model, max_tokens=12, stream=stream)
            return streamed(result)[0] if stream else result.choices[0].message.content
        result = complete(client, model, max_tokens=12, stream=stream)
        return streamed(result)[0] if stream else result.choices[0].text

    sequential = [run(call) for call in calls]
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        together = list(pool.map(run, calls * 3))
    assert together == sequential * 3


def test_a_client_leaving_mid_stream_frees_the_model(served):
    client, server, names = served
    stream = chat(client, names["a"], max_tokens=3500, stream=True)
    first = [next(iter(stream)) for _ in range(3)]
    assert first[0].choices[0].delta.role == "assistant"
    started = time.time()
    stream.close()
    # the engine drops the row at its next step: long before 3500 tokens could be generated
    while server.models.busy and time.time() - started < 10:
        time.sleep(0.02)
    assert not server.models.busy and time.time() - started < 1.5  # all 3500 tokens take ~3 s here
    assert chat(client, names["b"], max_tokens=3).usage.completion_tokens == 3


def test_lru_eviction_and_removed_models(jobs, cache_dir, served):
    reference_client, _, names = served
    models = [names["a"], names["b"], f"{names['a']}:ckpt-step-3", names["a"], "gpt-3.5-turbo", names["b"]]
    expected = [chat(reference_client, model).choices[0].message.content for model in models]
    root, _ = jobs
    copy = root.parent / "root-lru"  # a second server needs a root of its own (one server per jobs root)
    shutil.copytree(root, copy, ignore=shutil.ignore_patterns("ftlab.sqlite*", "serve.lock"), dirs_exist_ok=True)
    with live_server(copy, _overrides(cache_dir, "server.max_loaded_models=1")) as (url, server):
        client = OpenAI(base_url=url, api_key="x", max_retries=0, timeout=60)
        assert server.models.loaded() == {}  # nothing loads before the first request
        assert [chat(client, model).choices[0].message.content for model in models] == expected
        assert [len(adapters) for adapters in server.models.loaded().values()] == [1]
        assert complete(client, names["c"]).choices[0].text == complete(reference_client, names["c"]).choices[0].text
        client.models.delete(names["b"])
        with pytest.raises(openai.NotFoundError):
            chat(client, names["b"])
        assert chat(client, names["a"]).choices[0].message.content == expected[0]


def test_pool_loads_lazily_and_unloads_forgotten_adapters(jobs, cache_dir):
    from tests.test_chat import compose_cfg
    from trainer.engine import Sampling
    from trainer.serve.pool import ModelNotFound, ModelPool

    root, names = jobs
    pool = ModelPool(compose_cfg(cache_dir, "server.max_loaded_models=4"), root)
    with pytest.raises(ModelNotFound):
        pool.target("ft:gpt-3.5-turbo:personal::nosuchjob")
    targets = [pool.target(names["a"]), pool.target(names["b"])]
    assert pool.loaded() == {} and targets[0].backbone_key == targets[1].backbone_key
    for target in targets:
        ids = target.encode_chat(MESSAGES)
        assert pool.submit(target, ids, Sampling(max_new_tokens=2, temperature=0)).result()[0].n_tokens == 2
    assert [Path(p).parent.name for p in pool.loaded()[targets[0].backbone_key]] == ["a", "b"]
    pool.forget(names["b"])
    deadline = time.time() + 5  # the idle engine unloads it at once
    while len(pool.loaded()[targets[0].backbone_key]) > 1 and time.time() < deadline:
        time.sleep(0.01)
    assert [Path(p).parent.name for p in pool.loaded()[targets[0].backbone_key]] == ["a"]
    pool.close()
    assert pool.loaded() == {}


def test_logprobs_as_the_hosted_api_gives_them(served):
    client, _, names = served
    reply = chat(client, names["a"], logprobs=True, top_logprobs=2, max_tokens=8)
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens
    assert b"".join(bytes(entry.bytes) for entry in content).decode("utf-8", "replace").strip() or True
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].token == entry.token and entry.top_logprobs[0].logprob == entry.logprob  # greedy
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
    text, chunks = streamed(chat(client, names["a"], logprobs=True, top_logprobs=2, max_tokens=8, stream=True))
    streamed_entries = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, e.logprob) for e in streamed_entries] == [(e.token, e.logprob) for e in content]
    assert chat(client, names["a"]).choices[0].logprobs is None  # only when asked
    legacy = complete(client, names["c"], logprobs=2, max_tokens=5).choices[0].logprobs
    assert len(legacy.tokens) == len(legacy.token_logprobs) == len(legacy.top_logprobs) == len(legacy.text_offset)
    assert all(len(top) <= 2 for top in legacy.top_logprobs) and legacy.text_offset[0] == 0
    with pytest.raises(openai.BadRequestError):
        chat(client, names["a"], top_logprobs=2)  # needs logprobs: true


def test_a_full_queue_answers_429_with_retry_after_and_the_client_retries(jobs, cache_dir):
    import httpx

    root, names = jobs
    copy = root.parent / "root-queue"  # one server per jobs root
    shutil.copytree(root, copy, ignore=shutil.ignore_patterns("ftlab.sqlite*", "serve.lock"), dirs_exist_ok=True)
    with live_server(copy, _overrides(cache_dir, "server.max_batch_size=1", "server.max_queue=1")) as (url, server):
        client = OpenAI(base_url=url, api_key="x", max_retries=0, timeout=60)
        long = chat(client, names["a"], max_tokens=3500, stream=True)  # holds the only row
        next(iter(long))
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            queued = pool.submit(chat, client, names["b"], max_tokens=3)  # the one request that may wait
            deadline = time.time() + 10
            while time.time() < deadline:
                refused = httpx.post(f"{url}/chat/completions", json={"model": names["b"], "messages": MESSAGES,
                                                                      "max_tokens": 3})
                if refused.status_code == 429:
                    break
                time.sleep(0.05)
            assert refused.status_code == 429 and float(refused.headers["retry-after"]) > 0
            assert refused.json()["error"]["type"] == "rate_limit_error"
            patient = pool.submit(chat, OpenAI(base_url=url, api_key="x", max_retries=5, timeout=60), names["b"],
                                  max_tokens=3)
            long.close()  # frees the row: the queued request runs, then the retried one
            assert queued.result(timeout=60).usage.completion_tokens == 3
            assert patient.result(timeout=60).usage.completion_tokens == 3


def test_one_batch_serves_the_family_and_two_adapters_at_once(served):
    client, server, names = served
    models = [names["a"], "gpt-3.5-turbo", names["b"], f"{names['a']}:ckpt-step-3"] * 3
    questions = [[{"role": "user", "content": f"Q{i}"}] for i in range(len(models))]
    alone = [chat(client, model, messages=q, max_tokens=24).choices[0].message.content
             for model, q in zip(models, questions)]
    engine = next(iter(server.models._engines.values()))
    before = dict(engine.stats)
    with concurrent.futures.ThreadPoolExecutor(len(models)) as pool:
        together = list(pool.map(lambda pair: chat(client, pair[0], messages=pair[1], max_tokens=24)
                                 .choices[0].message.content, zip(models, questions)))
    assert together == alone
    steps = engine.stats["steps"] - before["steps"]
    assert (engine.stats["rows_stepped"] - before["rows_stepped"]) / steps > 2  # rows really shared the steps
