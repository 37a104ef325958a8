"""The decoding engine (trainer.engine) on the tiny Llama with two random LoRA adapters: batched greedy
answers equal one-at-a-time answers and transformers' own, rows of different adapters and base rows
share a batch without seeing each other, seeds hold whatever the neighbours, stop strings and
lengths end rows, streaming equals whole answers, log-probs are the model's, cancelled rows leave,
a full queue refuses, and a failed step fails only its own requests."""
import threading
import time

import pytest
import torch

from trainer.engine import Adapter, Engine, QueueFull, Request, Sampling
from trainer.engine import engine as engine_module

QUESTIONS = ["What is 2 + 2?", "Name a color.", "Hi", "Say something long about the sea and the sky.",
             "Why?", "Count to five, please, slowly and clearly."]


def load(folder):
    """A fresh copy of the tiny Llama in fp32 (an engine that loads adapters changes its model)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, attn_implementation="sdpa").eval()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(folder, tokenizer, {"a": dir, "b": dir}): the tiny Llama and two random LoRA adapters for it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.backbones import tiny_llama

    folder = tiny_llama(str(tmp_path_factory.mktemp("cache")))
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    adapters = {}
    for seed, name in enumerate("ab"):
        torch.manual_seed(seed)
        base = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
        config = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
        adapters[name] = tmp_path_factory.mktemp(f"adapter-{name}")
        get_peft_model(base, config).save_pretrained(str(adapters[name]))
    return folder, tokenizer, adapters


@pytest.fixture
def engine(tiny):
    made = Engine(load(tiny[0]), max_batch_size=8, max_queue=64)
    yield made
    made.close()


def prompt(tokenizer, question: str) -> list[int]:
    return tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                         tokenize=True, return_dict=True)["input_ids"]


def request(tiny, question: str, adapter: str | None = None, **sampling) -> Request:
    _, tokenizer, adapters = tiny
    sampling = {"max_new_tokens": 12, "temperature": 0.0} | sampling
    return Request(prompt(tokenizer, question), Sampling(**sampling), tokenizer, [tokenizer.eos_token_id],
                   Adapter(name, adapters[name]) if (name := adapter) else None)


def wait_until(condition, timeout: float = 5) -> None:
    deadline = time.time() + timeout
    while not condition() and time.time() < deadline:
        time.sleep(0.01)
    assert condition()


def texts(engine: Engine, requests: list[Request]) -> list[str]:
    return [choices[0].text for choices in engine.generate(requests)]


def test_greedy_batched_answers_equal_one_at_a_time_and_transformers_generate(tiny, engine):
    folder, tokenizer, _ = tiny
    model = load(folder)
    requests = [request(tiny, q) for q in QUESTIONS]
    alone = [texts(engine, [r])[0] for r in requests]
    assert texts(engine, requests) == alone
    for question, answer in zip(QUESTIONS[:3], alone):
        ids = torch.tensor([prompt(tokenizer, question)])
        output = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id)
        assert tokenizer.decode(output[0, ids.shape[1]:], skip_special_tokens=True) == answer
    assert len(set(alone)) > 1  # different prompts, different answers: the comparison means something


def test_a_frozen_fp32_model_decodes_with_packed_projections_and_the_same_answers(tiny, engine):
    """A served model (frozen, fp32, CPU) has its projections prepacked for oneDNN, LoRA's A and B excepted: its
    greedy answers, batched with adapter rows, equal the unpacked engine's, and its logits transformers' own."""
    from trainer.engine import packed

    folder, tokenizer, _ = tiny
    packed_engine = Engine(load(folder).requires_grad_(False), max_batch_size=8)
    try:
        assert packed_engine.packed_projections == 2 * 7 + 1 and engine.packed_projections == 0  # layers × 7 + head
        requests = [request(tiny, q, adapter) for q, adapter in zip(QUESTIONS, [None, "a", "b", None, "a", "b"])]
        assert texts(packed_engine, requests) == texts(engine, [request(tiny, q, adapter) for q, adapter
                                                                in zip(QUESTIONS, [None, "a", "b", None, "a", "b"])])
        lora_layers = [m for n, m in packed_engine.model.named_modules() if n.endswith(("lora_A.adapter0",
                                                                                         "lora_B.adapter0"))]
        assert lora_layers and not any("ftlab_packed" in m.__dict__ for m in lora_layers)
        network = packed_engine.network
        ids = torch.tensor([prompt(tokenizer, QUESTIONS[0])])
        with torch.inference_mode():
            packed_logits = network(input_ids=ids).logits
        with torch.no_grad():  # not inference mode: F.linear on the dense weights
            dense_logits = network(input_ids=ids).logits
        assert torch.allclose(packed_logits, dense_logits, atol=1e-5)
        assert not packed.packable(load(folder))  # a model that may be trained keeps one copy of its weights
    finally:
        packed_engine.close()


def test_rows_of_two_adapters_and_base_rows_share_a_batch_and_keep_their_own(tiny, engine, monkeypatch):
    adapters = [None, "a", "b"]
    requests = [request(tiny, q, adapters[i % 3], max_new_tokens=4 + 3 * i) for i, q in enumerate(QUESTIONS * 2)]
    alone = [texts(engine, [r])[0] for r in requests]
    plans = []
    groups = engine._groups
    monkeypatch.setattr(engine, "_groups", lambda *args: plans.append(groups(*args)) or plans[-1])
    together = texts(engine, requests)
    assert together == alone
    # rows joined and left at different steps, yet each adapter's rows stayed one slice of the batch
    assert len(plans) > 10 and all(isinstance(rows, slice) for plan in plans for _, rows in plan)
    # each adapter changes the answer to the same question: rows really ran with their own weights
    same_question = texts(engine, [request(tiny, QUESTIONS[3], adapter) for adapter in adapters])
    assert len(set(same_question)) == 3
    assert engine.stats["steps"] > 0 and engine.stats["rows_stepped"] / engine.stats["steps"] > 1


def test_a_seed_gives_the_same_sample_whatever_its_neighbours(tiny, engine):
    seeded = request(tiny, QUESTIONS[0], temperature=1.0, seed=7, n=3)
    alone = [c.text for c in engine.generate([seeded])[0]]
    crowd = engine.generate([request(tiny, q, "a", temperature=1.0) for q in QUESTIONS] + [seeded])[-1]
    assert [c.text for c in crowd] == alone
    assert len(set(alone)) > 1  # the n choices draw from streams of their own
    other_seed = [c.text for c in engine.generate([request(tiny, QUESTIONS[0], temperature=1.0, seed=8, n=3)])[0]]
    assert other_seed != alone


def test_stop_strings_stop_tokens_and_lengths_end_rows(tiny, engine):
    _, tokenizer, _ = tiny
    (full,) = engine.generate([request(tiny, QUESTIONS[3], max_new_tokens=20)])[0]
    assert full.finish_reason == "length" and full.n_tokens == 20 and len(full.token_ids) == 20
    stop = full.text[4:7]
    (cut,) = engine.generate([request(tiny, QUESTIONS[3], max_new_tokens=20, stop=(stop,))])[0]
    assert cut.finish_reason == "stop" and cut.text == full.text[: full.text.index(stop)]
    # the first generated token as a stop token: the reply is empty and ends with "stop"
    first = full.token_ids[0]
    stopped = Request(prompt(tokenizer, QUESTIONS[3]), Sampling(max_new_tokens=20, temperature=0.0), tokenizer, [first])
    (empty,) = engine.generate([stopped])[0]
    assert (empty.text, empty.finish_reason, empty.n_tokens) == ("", "stop", 0)


def test_streamed_deltas_add_up_to_the_whole_answer(tiny, engine):
    generation = engine.submit(request(tiny, QUESTIONS[5], "b", n=2, max_new_tokens=16))
    deltas = list(generation)
    streamed = ["".join(d.text for d in deltas if d.index == i) for i in range(2)]
    (whole,) = engine.generate([request(tiny, QUESTIONS[5], "b", n=2, max_new_tokens=16)])
    assert streamed == [c.text for c in whole]
    assert sum(d.finish_reason is not None for d in deltas) == 2


def test_logprobs_are_the_models_own(tiny, engine):
    folder, tokenizer, _ = tiny
    model = load(folder)
    (choice,) = engine.generate([request(tiny, QUESTIONS[1], logprobs=True, top_logprobs=3, max_new_tokens=4)])[0]
    assert [entry.token_id for entry in choice.logprobs] == choice.token_ids
    ids = prompt(tokenizer, QUESTIONS[1])
    with torch.no_grad():
        logits = model(torch.tensor([ids + choice.token_ids])).logits[0]
    expected = torch.log_softmax(logits[len(ids) - 1: len(ids) - 1 + len(choice.token_ids)], dim=-1)
    for position, entry in enumerate(choice.logprobs):
        assert entry.logprob == pytest.approx(float(expected[position, entry.token_id]), abs=1e-4)
        assert [token for token, _ in entry.top][0] == entry.token_id  # greedy: the top token is the chosen one
        assert len(entry.top) == 3 and entry.top == sorted(entry.top, key=lambda pair: -pair[1])


def test_a_shared_prefix_is_computed_once_and_answers_do_not_change(tiny, engine, monkeypatch):
    _, tokenizer, _ = tiny
    system = "You are a careful assistant. " * 4
    requests = [Request(tokenizer.apply_chat_template([{"role": "system", "content": system},
                                                       {"role": "user", "content": q}], add_generation_prompt=True,
                                                      tokenize=True, return_dict=True)["input_ids"],
                        Sampling(max_new_tokens=10, temperature=0.0), tokenizer, [tokenizer.eos_token_id])
                for q in QUESTIONS]
    shared = texts(engine, requests)
    assert engine.stats["shared_prompt_tokens"] > len(system)
    monkeypatch.setattr(engine_module, "MIN_SHARED_PREFIX", 10**9)
    assert texts(engine, requests) == shared


def test_rows_outgrow_the_cache_and_keep_their_answers(tiny, engine):
    long = [request(tiny, q, max_new_tokens=150) for q in QUESTIONS[:3]]  # past the first 64 and 128 positions
    alone = [texts(engine, [r])[0] for r in long]
    assert texts(engine, long) == alone


def test_a_cancelled_request_leaves_the_batch_at_the_next_step(tiny, engine):
    generation = engine.submit(request(tiny, QUESTIONS[3], max_new_tokens=100_000))
    next(iter(generation))
    generation.cancel()
    wait_until(lambda: not engine.busy)


def test_a_full_queue_refuses_and_a_blocking_submit_waits(tiny):
    engine = Engine(load(tiny[0]), max_batch_size=1, max_queue=1)
    try:
        running = engine.submit(request(tiny, QUESTIONS[3], max_new_tokens=100_000))
        next(iter(running))  # admitted: the batch is full
        waiting = engine.submit(request(tiny, QUESTIONS[0]))
        with pytest.raises(QueueFull) as refused:
            engine.submit(request(tiny, QUESTIONS[1]))
        assert refused.value.retry_after > 0
        later = []
        submitter = threading.Thread(target=lambda: later.append(engine.submit(request(tiny, QUESTIONS[1]),
                                                                               block=True)))
        submitter.start()
        running.cancel()
        submitter.join(timeout=30)
        assert waiting.result()[0].finish_reason and later[0].result()[0].finish_reason
    finally:
        engine.close()


def test_a_failed_step_fails_its_requests_and_the_engine_serves_on(tiny, engine, monkeypatch):
    broken = {"once": True}
    forward = engine._forward

    def fail_once(*args):
        if broken.pop("once", False):
            raise RuntimeError("simulated device error")
        return forward(*args)

    monkeypatch.setattr(engine, "_forward", fail_once)
    with pytest.raises(RuntimeError, match="simulated"):
        engine.generate([request(tiny, QUESTIONS[0])])
    assert texts(engine, [request(tiny, QUESTIONS[0])])[0] == texts(engine, [request(tiny, QUESTIONS[0])])[0]


def test_adapters_in_use_are_never_evicted_and_forgotten_ones_unload(tiny):
    engine = Engine(load(tiny[0]), max_batch_size=4, max_adapters=1)
    try:
        expected = {name: texts(engine, [request(tiny, QUESTIONS[3], name)])[0] for name in "ab"}
        together = texts(engine, [request(tiny, QUESTIONS[3], name) for name in "ab"])  # two adapters, room for one
        assert together == [expected["a"], expected["b"]]
        wait_until(lambda: len(engine.adapters) == 1)  # the idle engine unloads the one beyond max_adapters
        engine.forget(next(iter(engine.adapters)))
        wait_until(lambda: not engine.adapters)
    finally:
        engine.close()
