"""trainer.moderation: the lexicon screen, actions, the dropped-examples file, the classifier hook."""
import inspect
import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate

from trainer.moderation import (
    LEXICON,
    ClassifierScreen,
    LexiconScreen,
    NoScreen,
    example_texts,
    screen_file,
    screen_files,
)
from trainer.schema import register_configs

CONF = Path(__file__).resolve().parent.parent / "conf"

FLAGGED = {
    "hate": "honestly all immigrants are vermin",
    "harassment": "nobody likes you, loser",
    "violence": "I am going to kill you tomorrow",
    "self-harm": "some days I want to die",
    "sexual/minors": "explicit sexual photos of a 12-year-old",
    "pii/email": "write to jane.doe@gmail.com",
    "pii/phone": "call me on (415) 867-5309",
    "pii/api_key": "my key is sk-proj-abcdefghijklmnopqrstuvwxyz123456",
}
CLEAN = [
    "kill the process with SIGTERM", "the movie was a killer", "sex education curriculum for adults",
    "contact support@example.com or 555-0142", "our 10-year-old dog loves walks", "version 1.2.3.4",
    "Invoice 2023-10-01 total 1,234.56", "She shot the photo at f/2.8", "ship to 221B Baker Street",
]


def chat(text, answer="ok"):
    return {"messages": [{"role": "user", "content": text}, {"role": "assistant", "content": answer}]}


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("category, text", FLAGGED.items())
def test_lexicon_flags_each_category(category, text):
    assert LexiconScreen().screen_texts([text]) == [[category]]


def test_lexicon_leaves_ordinary_text_alone():
    assert LexiconScreen().screen_texts(CLEAN) == [[] for _ in CLEAN]


def test_categories_can_be_limited_and_extended():
    screen = LexiconScreen(categories=["pii/email"], extra_patterns={"competitor": [r"\bacme corp\b"]})
    assert screen.screen_texts([FLAGGED["violence"], "ACME Corp is better", FLAGGED["pii/email"]]) == [
        [], ["competitor"], ["pii/email"]]
    # patterns added to a built-in category are not hidden by its keyword pre-check
    assert LexiconScreen(extra_patterns={"violence": [r"\bpunch\b"]}).screen_texts(["I will punch"]) == [["violence"]]
    with pytest.raises(ValueError, match="unknown"):
        LexiconScreen(categories=["nonsense"])


def test_bad_action_is_rejected_with_choices():
    with pytest.raises(ValueError, match="moderation.action='block'.*off, warn, drop, fail"):
        LexiconScreen(action="block")
    assert LexiconScreen(action=False).action == "off"  # YAML 1.1 `off`


def test_texts_cover_chat_and_prompt_completion():
    assert example_texts({"messages": [{"role": "user", "content": "a", "name": "n"}, "junk"]}) == ["a", "n"]
    assert example_texts({"prompt": "p", "completion": "c"}) == ["p", "c"]
    assert example_texts([1, 2]) == []


def test_warn_reports_but_keeps_everything(tmp_path):
    path = write_rows(tmp_path / "train.jsonl", [chat("hello"), chat(FLAGGED["pii/email"]), chat("bye")])
    report = screen_files(LexiconScreen(action="warn"), {"train": path}, tmp_path / "run")
    assert [(f["line"], f["categories"]) for f in report.flagged] == [(2, ["pii/email"])]
    assert report.screened_files == {} and report.dropped_file is None
    saved = json.loads((tmp_path / "run" / "moderation.json").read_text())
    assert saved["n_flagged"] == 1 and saved["by_category"] == {"pii/email": 1}


def test_drop_writes_screened_file_and_keeps_dropped_examples(tmp_path):
    rows = [chat("hello"), chat(FLAGGED["violence"]), chat("fine"), chat("x", answer=FLAGGED["pii/api_key"])]
    path = tmp_path / "train.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b"\r\n\n".join(json.dumps(r).encode() for r in rows) + b"\r\n")
    run = tmp_path / "run"
    report = screen_files(LexiconScreen(action="drop"), {"train": path}, run)
    screened = report.screened_files["train"]
    assert screened == run / "train.screened.jsonl"
    assert [json.loads(line) for line in screened.read_text().splitlines()] == [rows[0], rows[2]]
    dropped = [json.loads(line) for line in report.dropped_file.read_text().splitlines()]
    assert [(d["line"], d["categories"], d["example"]) for d in dropped] == [
        (3, ["violence"], rows[1]), (7, ["pii/api_key"], rows[3])]


def test_off_screens_nothing(tmp_path):
    path = write_rows(tmp_path / "train.jsonl", [chat(FLAGGED["violence"])])
    report = screen_files(NoScreen(), {"train": path}, tmp_path / "run")
    assert report.action == "off" and report.flagged == []


def test_classifier_hook(tmp_path):
    calls = []

    def classify(texts):
        calls.append(len(texts))
        return [{"toxic": 0.9 if "bad" in t else 0.1, "spam": 0.5} for t in texts]

    screen = ClassifierScreen(classifier=classify, threshold=0.6, batch_size=2)
    assert screen.screen_texts(["good", "bad", "fine"]) == [[], ["toxic"], []]
    assert calls == [2, 1]
    path = write_rows(tmp_path / "t.jsonl", [chat("bad words"), chat("nice")])
    assert [line for line, _, _ in screen_file(screen, path)] == [1]
    with pytest.raises(ValueError, match="returned 0 results for 1 texts"):
        ClassifierScreen(classifier=lambda texts: []).screen_texts(["x"])


@pytest.mark.parametrize("preset", sorted(p.stem for p in (CONF / "moderation").glob("*.yaml")))
def test_presets_compose_match_signatures_and_build(preset):
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        node = compose(config_name="config", overrides=[f"moderation={preset}"]).moderation
    target = instantiate({"_target_": "hydra.utils.get_class", "path": node._target_})
    params = inspect.signature(target).parameters
    assert set(node) - {"_target_"} <= set(params)
    screen = instantiate(node)
    assert screen.action in ("off", "warn", "drop", "fail")
    assert len(screen.screen_texts(["hello", FLAGGED["pii/email"]])) == 2


def test_lexicon_patterns_compile():
    assert set(LexiconScreen().patterns) == set(LEXICON)
