"""chat / complete on a tiny trained job: the prompt is tokenized exactly as training tokenized it,
one-shot and REPL modes, streaming, stop tokens, and the job/format checks."""
import builtins
import io

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from tests.conftest import chat_example, write_jsonl
from trainer.chat import chat_main, complete_main
from trainer.inference import (
    encode_chat_prompt,
    end_of_turn_ids,
    load_model,
    open_job,
    stream_reply,
    training_prompt_suffix,
)
from trainer.compose import CONFIG_DIR
from trainer.data.tokenize import IGNORE_INDEX, encode_chat
from trainer.schema import register_configs
from trainer.train import run_training


def compose_cfg(cache_dir: str, *overrides: str):
    """conf/config.yaml on the tiny Llama, CPU, no logger (as tests/conftest.py's make_cfg, any scope)."""
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=["backbone=tiny-llama", "logger=none", "train.device=cpu", "train.precision=fp32",
                                                         f"cache_dir={cache_dir}", *overrides])


def train_job(cache_dir: str, folder, *overrides: str):
    """A 2-step job in `folder/run`, with the `.hydra/config.yaml` Hydra would have written."""
    cfg = compose_cfg(cache_dir, "train.max_steps=2", "train.batch_size=4", "train.checkpoint_every=1",
                      *overrides)
    run_dir = folder / "run"
    assert run_training(cfg, run_dir) == 0
    (run_dir / ".hydra").mkdir()
    OmegaConf.save(OmegaConf.to_container(cfg, enum_to_str=True), run_dir / ".hydra" / "config.yaml")
    return run_dir


@pytest.fixture(scope="module")
def tiny_chat_job(tmp_path_factory, cache_dir):
    """A finished 2-step chat job (12 arithmetic examples + 4 validation) on the tiny Llama."""
    folder = tmp_path_factory.mktemp("chatjob")
    train = write_jsonl(folder / "train.jsonl", [chat_example(f"What is {i} + {i}?", str(2 * i)) for i in range(12)])
    valid = write_jsonl(folder / "valid.jsonl", [chat_example(f"What is {i} + 1?", str(i + 1)) for i in range(4)])
    return train_job(cache_dir, folder, "data=custom", f"data.train_file={train}", f"data.validation_file={valid}",
                     "data.task=exact")


@pytest.fixture(scope="module")
def tiny_completion_job(tmp_path_factory, cache_dir):
    folder = tmp_path_factory.mktemp("pcjob")
    rows = [{"prompt": f"Ticket {i}: my card was charged twice\n\n###\n\n", "completion": " billing\n"} for i in range(8)]
    train = write_jsonl(folder / "pc.jsonl", rows)
    return train_job(cache_dir, folder, "model=babbage-002", "data=custom", f"data.train_file={train}")


def use_cfg(cache_dir, job, *overrides):
    return compose_cfg(cache_dir, f"job={job}", "generation.max_new_tokens=6", *overrides)


def test_prompt_is_the_exact_training_prefix(tiny_chat_job, cache_dir):
    cfg = use_cfg(cache_dir, tiny_chat_job)
    job_cfg, job = open_job(cfg)
    loaded = load_model(job_cfg, job)
    example = chat_example("What is 3 + 3?", "6")
    input_ids, labels = encode_chat(example, loaded.tokenizer)
    first_trained = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    assert encode_chat_prompt(loaded.tokenizer, example["messages"][:-1]) == input_ids[:first_trained]
    # the reply ends with the template's end-of-turn token, which generation stops at
    im_end = loaded.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end in end_of_turn_ids(loaded.tokenizer, chat=True) and im_end in input_ids[first_trained:]
    assert type(loaded.model).__name__.startswith("PeftModel") and loaded.label.startswith("ft:gpt-3.5-turbo:personal::")


def test_chat_prompt_prints_one_reply(tiny_chat_job, cache_dir, capsys):
    assert chat_main(use_cfg(cache_dir, tiny_chat_job, "prompt=What is 2 + 2?", "system=Reply briefly.")) == 0
    out = capsys.readouterr().out
    assert out.endswith("\n") and out.count("\n") >= 1


def test_chat_by_id_and_ft_name_and_base(tiny_chat_job, cache_dir, monkeypatch, capsys):
    job = OmegaConf.load(tiny_chat_job / ".hydra" / "config.yaml")
    import json

    record = json.loads((tiny_chat_job / "job.json").read_text())
    monkeypatch.setenv("FTLAB_OUTPUTS", str(tiny_chat_job.parent))
    for reference in [record["id"], record["fine_tuned_model"], "latest"]:
        assert open_job(use_cfg(cache_dir, reference))[1].id == record["id"]
    cfg, found = open_job(use_cfg(cache_dir, "base"))
    assert found is None and cfg.backbone.name == job.backbone.name
    assert type(load_model(cfg, None).model).__name__ == "LlamaForCausalLM"
    no_adapter = use_cfg(cache_dir, record["id"], "adapter=false", "prompt=hi")
    assert chat_main(no_adapter) == 0
    assert "no adapter" in capsys.readouterr().err


def test_repl_streams_replies_and_keeps_the_conversation(tiny_chat_job, cache_dir, monkeypatch, capsys):
    lines = iter(["What is 1 + 1?", "/reset", "", "And 2 + 2?", "/system Be terse.", "3 + 3?"])

    def fake_input(prompt=""):
        print(prompt, end="")
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr(builtins, "input", fake_input)
    assert chat_main(use_cfg(cache_dir, tiny_chat_job)) == 0
    out = capsys.readouterr().out
    assert out.count("assistant> ") == 3 and out.count("you> ") == 7


def test_stream_reply_writes_tokens_as_they_come(tiny_chat_job, cache_dir):
    cfg = use_cfg(cache_dir, tiny_chat_job, "generation.max_new_tokens=8")
    job_cfg, job = open_job(cfg)
    loaded = load_model(job_cfg, job)
    loaded.stop_token_ids = []  # random weights may end at once; force 8 tokens
    writes = []

    class Recorder(io.StringIO):
        def write(self, text):
            writes.append(text)
            return len(text)

    ids = encode_chat_prompt(loaded.tokenizer, [{"role": "user", "content": "hi"}])
    reply = stream_reply(loaded, ids, job_cfg.generation, out=Recorder())
    assert len([w for w in writes if w]) >= 2 and "".join(writes) == reply + "\n"


def test_stop_strings_cut_the_reply(tiny_chat_job, cache_dir):
    job_cfg, job = open_job(use_cfg(cache_dir, tiny_chat_job, "generation.max_new_tokens=12"))
    loaded = load_model(job_cfg, job)
    loaded.stop_token_ids = []
    ids = encode_chat_prompt(loaded.tokenizer, [{"role": "user", "content": "hi"}])
    full = stream_reply(loaded, ids, job_cfg.generation, out=io.StringIO())
    if len(full) < 3:
        pytest.skip("reply too short to cut")
    job_cfg.generation.stop = [full[2:4]]
    cut = stream_reply(loaded, ids, job_cfg.generation, out=io.StringIO())
    assert cut == full[: full.index(full[2:4])]


def test_complete_appends_the_training_separator(tiny_completion_job, cache_dir, capsys):
    _, job = open_job(use_cfg(cache_dir, tiny_completion_job))
    assert training_prompt_suffix(job) == "\n\n###\n\n"
    assert complete_main(use_cfg(cache_dir, tiny_completion_job, "prompt=My card was charged twice")) == 0
    assert capsys.readouterr().out.endswith("\n")


def test_wrong_verb_or_unknown_job_is_explained(tiny_completion_job, tiny_chat_job, cache_dir, tmp_path, capsys):
    assert chat_main(use_cfg(cache_dir, tiny_completion_job, "prompt=x")) == 2
    assert "use `ftlab complete`" in capsys.readouterr().err
    assert complete_main(use_cfg(cache_dir, tiny_chat_job, "prompt=x")) == 2
    assert "use `ftlab chat`" in capsys.readouterr().err
    assert chat_main(use_cfg(cache_dir, "ftjob-doesnotexist", f"jobs_root={tmp_path}", "prompt=x")) == 2
    assert "ftlab jobs list" in capsys.readouterr().err.replace("\n", " ")


def test_chat_replies_keep_calls_to_the_declared_functions(tiny_chat_job, cache_dir):
    from trainer.call_constraint import CallConstraint
    from trainer.data.tools import CALL_OPEN

    job_cfg, job = open_job(use_cfg(cache_dir, tiny_chat_job, "generation.max_new_tokens=40"))
    loaded = load_model(job_cfg, job)
    loaded.stop_token_ids = []
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    assert CallConstraint.for_tools(loaded.tokenizer, tools).heads == ['{"name": "get_weather"']
    ids = encode_chat_prompt(loaded.tokenizer, [{"role": "user", "content": "hi"}], tools)
    forced = CallConstraint(loaded.tokenizer, ["get_weather"], must_call=True)  # a random model must still call it
    reply = stream_reply(loaded, ids, job_cfg.generation, out=io.StringIO(), constraint=forced)
    assert reply.startswith(CALL_OPEN + '{"name": "get_weather"'), reply
