"""trainer.preflight: validate → screen → estimate before a job, the verbs' exit codes and files."""
import json
import random
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf
from rich.console import Console

from trainer import preflight
from trainer.data.tokens import get_encoding
from trainer.preflight import (
    PreflightError,
    estimate,
    run_estimate,
    run_preflight,
    validate,
)
from trainer.schema import register_configs

CONF = Path(__file__).resolve().parent.parent / "conf"
ENC = get_encoding("cl100k_base")


def compose_cfg(*overrides, hydra=False):
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=hydra)


def cfg_for(train, validation=None, *overrides):
    return compose_cfg("data=custom", f"data.train_file={train}",
                       f"data.validation_file={validation if validation else 'null'}", *overrides)


def console():
    return Console(width=160, record=True, force_terminal=False)


def chat(i, system=True):
    messages = ([{"role": "system", "content": "Answer with a number."}] if system else []) + [
        {"role": "user", "content": f"What is {i} + {i}?"}, {"role": "assistant", "content": str(2 * i)}]
    return {"messages": messages}


def write_rows(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_clean_data_passes_and_writes_the_record(tmp_path):
    train = write_rows(tmp_path / "train.jsonl", [chat(i) for i in range(12)])
    valid = write_rows(tmp_path / "valid.jsonl", [chat(i) for i in range(100, 104)])
    run = tmp_path / "run"
    out = console()
    result = run_preflight(cfg_for(train, valid), run, out)
    assert result.train_file == train and result.validation_file == valid
    assert result.report.ok
    saved = json.loads((run / "validation.json").read_text())
    assert saved["ok"] is True and saved["errors"] == []
    assert set(saved["stats"]) == {"train", "validation", "moderation"}
    assert saved["stats"]["train"]["messages_per_example"]["mean"] == 3
    assert (run / "token_lengths.png").stat().st_size > 1000
    assert json.loads((run / "estimate.json").read_text()) == json.loads(json.dumps(result.estimate))
    assert result.estimate["n_examples"] == 12 and result.estimate["n_epochs"] == 8  # 100 // 12
    text = out.export_text(clear=False)
    assert "billed tokens per epoch" in text and "Statistics" in text


def test_estimate_json_matches_hand_counts_on_unseen_files(tmp_path):
    """Random files the code has never seen; tokens recounted here with the bare encoding."""
    rng = random.Random(7)
    words = ["alpha", "beta", "Ωmega", "数据", "🙂", "don't", "\n", "  ", "JSON", "{\"k\": 1}"]
    rows, by_hand = [], []
    for _ in range(37):
        messages = [{"role": "system", "content": " ".join(rng.choices(words, k=rng.randint(1, 20)))}]
        for turn in range(rng.randint(1, 3)):
            messages.append({"role": "user", "content": " ".join(rng.choices(words, k=rng.randint(1, 30)))})
            reply = {"role": "assistant", "content": " ".join(rng.choices(words, k=rng.randint(1, 30)))}
            if rng.random() < 0.3:
                reply["name"] = rng.choice(["bob", "helper_1"])
            messages.append(reply)
        rows.append({"messages": messages})
        tokens = 3
        for m in messages:
            tokens += 3 + sum(len(ENC.encode(v)) for v in m.values()) + ("name" in m)
        by_hand.append(tokens)
    rows.append({"messages": [{"role": "user", "content": "long " * 5000}, {"role": "assistant", "content": "ok"}]})
    by_hand.append(3 + (3 + 1 + 5000) + (3 + 1 + 1))  # "long " x 5000 = 5000 tokens, "ok" = 1
    train = write_rows(tmp_path / "train.jsonl", rows)
    run = tmp_path / "run"
    assert estimate(cfg_for(train, None, "train.n_epochs=2"), run, console()) == 0
    saved = json.loads((run / "estimate.json").read_text())
    per_epoch = sum(min(4096, t) for t in by_hand)
    assert saved["model"] == "gpt-3.5-turbo" and saved["n_examples"] == 38 and saved["n_too_long"] == 1
    assert saved["billed_tokens_per_epoch"] == per_epoch
    assert saved["n_epochs"] == 2 and saved["billed_tokens"] == 2 * per_epoch
    assert saved["training_cost_usd"] == pytest.approx(2 * per_epoch / 1000 * 0.008)
    assert saved["fine_tuned_input_per_1k"] == 0.012 and saved["fine_tuned_output_per_1k"] == 0.016
    assert saved["local"]["wall_time_s"] > 0 and saved["local"]["cost_usd"] > 0


def test_prompt_completion_estimate(tmp_path):
    rows = [{"prompt": f"Ticket {i}: printer jammed\n\n###\n\n", "completion": " hardware\n"} for i in range(20)]
    by_hand = sum(len(ENC.encode(r["prompt"])) + len(ENC.encode(r["completion"])) for r in rows)
    train = write_rows(tmp_path / "train.jsonl", rows)
    result = run_preflight(cfg_for(train, None, "model=babbage-002"), tmp_path / "run", console())
    assert result.estimate["billed_tokens_per_epoch"] == by_hand
    assert result.estimate["n_epochs"] == 5
    assert result.estimate["training_cost_usd"] == pytest.approx(5 * by_hand / 1000 * 0.0004)


def test_errors_refuse_the_job_naming_file_and_line(tmp_path):
    rows = [chat(i) for i in range(12)]
    rows[4] = {"messages": [{"role": "user", "content": "no reply"}]}
    train = write_rows(tmp_path / "train.jsonl", rows)
    run = tmp_path / "run"
    with pytest.raises(PreflightError) as info:
        run_preflight(cfg_for(train), run, console())
    err = info.value
    assert (err.code, err.file, err.line) == ("example_missing_assistant_message", str(train), 5)
    assert err.message.startswith(f"{train}:5: ") and "add the assistant reply" in err.message
    assert not (run / "estimate.json").exists()
    saved = json.loads((run / "validation.json").read_text())
    assert saved["ok"] is False
    assert saved["errors"] == [{"file": str(train), "line": 5, "code": "example_missing_assistant_message",
                                "message": saved["errors"][0]["message"]}]


def test_over_budget_is_refused(tmp_path):
    train = write_rows(tmp_path / "train.jsonl", [chat(i) for i in range(12)])
    with pytest.raises(PreflightError) as info:
        run_preflight(cfg_for(train, None, "train.max_cost_usd=0.0001"), tmp_path / "run", console())
    assert info.value.code == "over_budget" and "train.max_cost_usd" in info.value.message
    assert json.loads((tmp_path / "run" / "estimate.json").read_text())["over_budget"] is True
    run_preflight(cfg_for(train, None, "train.max_cost_usd=1.0"), tmp_path / "run2", console())


def test_moderation_drop_trains_on_the_screened_file(tmp_path):
    rows = [chat(i) for i in range(12)]
    rows[2]["messages"][1]["content"] = "email me at real.person@gmail.com"
    train = write_rows(tmp_path / "train.jsonl", rows)
    run = tmp_path / "run"
    result = run_preflight(cfg_for(train, None, "moderation.action=drop"), run, console())
    assert result.train_file == run / "train.screened.jsonl"
    kept = [json.loads(line) for line in result.train_file.read_text().splitlines()]
    assert kept == rows[:2] + rows[3:]
    dropped = [json.loads(line) for line in (run / "moderation.dropped.jsonl").read_text().splitlines()]
    assert [(d["line"], d["categories"]) for d in dropped] == [(3, ["pii/email"])]
    assert result.estimate["n_examples"] == 11
    saved = json.loads((run / "validation.json").read_text())
    assert [(w["line"], w["code"]) for w in saved["warnings"] if w["code"] == "moderation_flagged"] == [(3, "moderation_flagged")]


def test_moderation_fail_refuses_and_off_skips(tmp_path):
    rows = [chat(i) for i in range(12)]
    rows[7]["messages"][2]["content"] = "I am going to kill you"
    train = write_rows(tmp_path / "train.jsonl", rows)
    with pytest.raises(PreflightError) as info:
        run_preflight(cfg_for(train, None, "moderation.action=fail"), tmp_path / "run", console())
    assert (info.value.code, info.value.line) == ("moderation_flagged", 8) and "violence" in info.value.message
    result = run_preflight(cfg_for(train, None, "moderation=off"), tmp_path / "run2", console())
    assert result.report.moderation.flagged == [] and result.train_file == train


@pytest.mark.parametrize("make, code", [
    (lambda d: d / "missing.jsonl", 2),
    (lambda d: d, 2),
    (lambda d: write_rows(d / "empty.jsonl", []), 2),
    (lambda d: (d / "blank.jsonl").write_bytes(b"\n \r\n\n") and d / "blank.jsonl", 2),
    (lambda d: (d / "latin1.jsonl").write_bytes(b'{"messages": "caf\xe9"}\n') and d / "latin1.jsonl", 1),
    (lambda d: (d / "big.jsonl").write_bytes(b"x" * (50 * 2**20) + b"\n") and d / "big.jsonl", 1),
    (lambda d: (d / "bom.jsonl").write_bytes(
        b"\xef\xbb\xbf" + b"\r\n\r\n".join(json.dumps(chat(i)).encode() for i in range(12)) + b"\r\n") and d / "bom.jsonl", 0),
])
def test_bad_input_gets_a_message_and_exit_code_not_a_traceback(tmp_path, make, code):
    path = make(tmp_path)
    out = console()
    assert validate(cfg_for(path), tmp_path / "run", out) == code
    saved = json.loads((tmp_path / "run" / "validation.json").read_text())
    assert saved["ok"] is (code == 0)
    if code:
        assert str(path) in out.export_text(clear=False).replace("\n", "") or saved["errors"][0]["file"] == str(path)
    if code == 2:
        assert "error:" in out.export_text(clear=False)
        assert estimate(cfg_for(path), tmp_path / "run", console()) == 2


def test_estimate_bad_epochs_is_a_clear_error(tmp_path):
    train = write_rows(tmp_path / "train.jsonl", [chat(i) for i in range(3)])
    out = console()
    assert estimate(cfg_for(train, None, "train.n_epochs=lots"), tmp_path / "run", out) == 2
    assert "train.n_epochs='lots'" in out.export_text(clear=False)
    with pytest.raises(PreflightError) as info:
        run_preflight(cfg_for(train, None, "train.n_epochs=0"), tmp_path / "run2", console())
    assert info.value.code == "invalid_config"


def test_estimate_counts_valid_lines_of_a_file_with_errors(tmp_path):
    train = write_rows(tmp_path / "train.jsonl", [chat(1), "{broken", chat(2)])
    out = console()
    result = run_estimate(cfg_for(train), tmp_path / "run", out)
    assert result["n_examples"] == 2 and result["n_unparseable_lines"] == 1
    assert "ftlab validate" in out.export_text(clear=False)


def test_verbs_use_the_hydra_run_dir(tmp_path):
    train = write_rows(tmp_path / "train.jsonl", [chat(i) for i in range(12)])
    run = tmp_path / "hydra-run"
    cfg = compose_cfg("data=custom", f"data.train_file={train}", "data.validation_file=null",
                      f"hydra.run.dir={run}", hydra=True)
    OmegaConf.set_readonly(cfg.hydra, False)
    cfg.hydra.runtime.output_dir = str(run)  # what Hydra sets when it runs the app
    HydraConfig.instance().set_config(cfg)
    try:
        assert preflight.validate_main(cfg) == 0
        assert preflight.estimate_main(cfg) == 0
    finally:
        HydraConfig.instance().cfg = None
    assert (run / "validation.json").exists() and (run / "estimate.json").exists()


def test_markup_like_text_in_data_is_printed_verbatim(tmp_path):
    rows = [chat(i) for i in range(12)]
    rows[0]["messages"][1]["[/bold]"] = 1
    rows[1]["messages"][1]["role"] = "[red]x[/oops]"
    train = write_rows(tmp_path / "train.jsonl", rows)
    out = console()
    assert validate(cfg_for(train), tmp_path / "run", out) == 1
    text = out.export_text(clear=False)
    assert "'[/bold]'" in text and "[red]x[/oops]" in text


def test_a_job_opens_its_training_file_once_for_checks_and_screen_once_to_hash_once_to_tokenize(
        make_cfg, chat_files, tmp_path, monkeypatch):
    import builtins
    import io
    import traceback

    from trainer.train import run_training

    train, valid = chat_files
    opened, real_open = [], builtins.open

    def spy(file, *args, **kwargs):
        if str(file) == str(train):
            opened.append(traceback.extract_stack(limit=4)[0].name)
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", spy)
    monkeypatch.setattr(io, "open", spy)
    cfg = make_cfg("data=custom", f"data.train_file={train}", f"data.validation_file={valid}", "moderation=lexicon",
                   "train.max_steps=1", f"cache_dir={tmp_path / 'cache'}")
    assert run_training(cfg, tmp_path / "run") == 0
    # the validator's pass feeds the content screen and the token counts; the hash is computed once
    # per process; tokenizing reads the file once more (a later job reads the tokenization cache instead)
    assert len(opened) == 3, opened


def test_the_preflight_imports_no_torch():
    """`ftlab validate` and `ftlab estimate` stay quick: the pre-flight's modules do not import torch (~1 s)."""
    import subprocess
    import sys

    probe = "import sys, trainer.preflight, trainer.cost, trainer.data.tokens; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == "False", result.stdout + result.stderr
