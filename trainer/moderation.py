"""Screening training data for unsafe content, as the hosted service does before a job runs.

A screen is a `_target_` node in the `moderation` config group, built with
`hydra.utils.instantiate`, with an `action`:

- ``off``  — do not screen;
- ``warn`` — report flagged lines (moderation.json, warnings in validation.json), train on all;
- ``drop`` — also remove flagged examples: training reads ``<run_dir>/train.screened.jsonl``
  and the dropped examples are kept, with line and categories, in
  ``<run_dir>/moderation.dropped.jsonl``;
- ``fail`` — refuse the job when anything is flagged.

The default, `LexiconScreen`, is a fast local screen with regular expressions. It is a
coarse net (it misses paraphrases and can flag innocent text), not a classifier.

Plugging in a classifier model: use `ClassifierScreen` with a `classifier` node that builds
a callable ``classify(texts: list[str]) -> list[dict[str, float]]`` (category → score in
[0, 1]); scores at or above `threshold` flag the example. For example
``conf/moderation/classifier.yaml``::

    _target_: trainer.moderation.ClassifierScreen
    action: warn
    threshold: 0.5
    classifier:
      _target_: mypackage.load_moderation_model   # returns the callable
      path: /models/my-moderation-model

Any class with the `Screen` interface (``action`` and ``screen_texts``) works as well.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from trainer.data.jsonl import iter_jsonl
from trainer.files import atomic_writer, write_json

ACTIONS = ("off", "warn", "drop", "fail")
BATCH_SIZE = 64

# Conservative patterns: phrases, not single ambiguous words ("kill the process" is fine).
LEXICON = {
    "hate": [
        r"\b(?:all|those|these|the) (?:jews|muslims|christians|blacks|whites|asians|immigrants|gays|women|mexicans|arabs) (?:are|r) (?:animals|vermin|subhuman|parasites|a disease|filth)\b",
        r"\bsubhumans?\b",
        r"\bethnic cleansing\b",
        r"\b(?:exterminate|gas) (?:the|all) (?:jews|muslims|blacks|gays|immigrants)\b",
        r"\bwhite (?:power|supremacy)\b",
    ],
    "harassment": [
        r"\b(?:you are|you're|ur|youre) (?:a |an |such a )?(?:worthless|pathetic|disgusting) (?:piece of \w+|loser|idiot|moron|excuse)\b",
        r"\bnobody (?:likes|loves|wants) you\b",
        r"\bgo (?:kill|hang) yourself\b",
        r"\bi know where you live\b",
    ],
    "violence": [
        r"\b(?:i(?:'m| am)? (?:going to|gonna|will)) (?:kill|murder|shoot|stab|behead) (?:you|him|her|them|everyone)\b",
        r"\bhow (?:to|do i|can i) (?:make|build) (?:a )?(?:pipe )?bomb\b",
        r"\bmass shooting\b",
        r"\b(?:torture|mutilate) (?:him|her|them|you)\b",
    ],
    "self-harm": [
        r"\b(?:kill|hurt|harm|cut) (?:myself|yourself)\b",
        r"\bsuicid(?:e|al)\b",
        r"\bend (?:my|your) (?:own )?life\b",
        r"\bwant to die\b",
    ],
    "sexual/minors": [
        # a list of patterns flags only when all of them match: a minor and sexual content in one text
        [r"\b(?:child|children|kid|kids|minor|minors|underage|preteen|(?:[1-9]|1[0-7])[- ]year[- ]old)\b",
         r"\b(?:sex|sexual|sexually|nude|naked|porn|pornographic|erotic)\b"],
    ],
    # reserved documentation domains (RFC 2606: example.com, *.test, ...) are not PII
    "pii/email": [
        r"\b[A-Za-z0-9._%+-]+@(?!(?:[A-Za-z0-9-]+\.)*(?:example\.(?:com|net|org)|[A-Za-z0-9-]+\.(?:test|example|invalid|localhost))\b)"
        r"[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b"
    ],
    "pii/phone": [  # 555-0100..0199, reserved for fiction, is not PII
        r"(?<![\w+])(?:\+?1[ .-]?)?\(?\d{3}\)?[ .-](?!555[ .-]01\d\d)\d{3}[ .-]\d{4}(?!\d)",  # North American
        r"(?<![\w+])\+\d{1,3}(?:[ .-]?\d{2,4}){3,5}(?!\d)",  # international, with +
    ],
    "pii/api_key": [
        r"\bsk-(?:proj-)?[A-Za-z0-9_-]{20,}",  # OpenAI
        r"\bAKIA[0-9A-Z]{16}\b",  # AWS access key id
        r"\bgh[pousr]_[A-Za-z0-9]{36,}\b",  # GitHub
        r"\bxox[abprs]-[A-Za-z0-9-]{10,}",  # Slack
        r"\bAIza[0-9A-Za-z_-]{35}\b",  # Google
        r"-----BEGIN (?:RSA |EC |OPENSSH |DSA )?PRIVATE KEY-----",
    ],
}

# Cheap pre-checks (lowercase substrings, or a regex) that every LEXICON pattern of a category
# needs: text without any of them skips that category's regexes. Keep in sync with LEXICON.
TRIGGERS = {
    "hate": ("jews", "muslims", "christians", "blacks", "whites", "asians", "immigrants", "gays", "women",
             "mexicans", "arabs", "subhuman", "cleansing", "white power", "white supremacy"),
    "harassment": ("worthless", "pathetic", "disgusting", "nobody", "yourself", "where you live"),
    "violence": ("kill", "murder", "shoot", "stab", "behead", "bomb", "torture", "mutilate"),
    "self-harm": ("myself", "yourself", "suicid", "life", "die"),
    "sexual/minors": ("sex", "nude", "naked", "porn", "erotic"),
    "pii/email": ("@",),
    "pii/phone": re.compile(r"\d\d\d"),
    "pii/api_key": ("sk-", "akia", "gh", "xox", "aiza", "private key"),
}


def _triggered(trigger, lowered: str) -> bool:
    if trigger is None:
        return True
    if isinstance(trigger, re.Pattern):
        return trigger.search(lowered) is not None
    return any(word in lowered for word in trigger)


class Screen:
    """A content screen. Subclasses implement `screen_texts`."""

    name = "screen"

    def __init__(self, action: str = "warn"):
        action = _action(action)
        if action not in ACTIONS:
            raise ValueError(f"moderation.action={action!r} is not valid — use one of {', '.join(ACTIONS)}")
        self.action = action

    def screen_texts(self, texts: list[str]) -> list[list[str]]:
        """For each text, the categories it is flagged for (empty list: clean)."""
        raise NotImplementedError

    def screen_examples(self, examples: list[Any]) -> list[list[str]]:
        """For each example (any JSON value), the sorted categories flagged in any of its texts."""
        texts, owners = [], []
        for index, example in enumerate(examples):
            for text in example_texts(example):
                texts.append(text)
                owners.append(index)
        flagged = [set() for _ in examples]
        for owner, categories in zip(owners, self.screen_texts(texts) if texts else []):
            flagged[owner].update(categories)
        return [sorted(c) for c in flagged]


def _action(action: Any) -> str:
    if action is False:  # YAML 1.1 reads a bare `off` as false
        return "off"
    return str(action).lower()


class NoScreen(Screen):
    """Screens nothing (`moderation=off`)."""

    name = "off"

    def __init__(self, action: str = "off"):
        super().__init__(action)

    def screen_texts(self, texts: list[str]) -> list[list[str]]:
        return [[] for _ in texts]


class LexiconScreen(Screen):
    """Regular-expression screen. `categories` limits it to some of LEXICON's categories;
    `extra_patterns` ({category: [regex, ...]}) adds your own; an item that is itself a list of
    regexes flags only when all of them match."""

    name = "lexicon"

    def __init__(self, action: str = "warn", categories: Optional[list[str]] = None,
                 extra_patterns: Optional[dict] = None):
        super().__init__(action)
        unknown = sorted(set(categories or ()) - set(LEXICON))
        if unknown:
            raise ValueError(f"moderation.categories: unknown {unknown} — choose from {', '.join(LEXICON)}")
        chosen = {c: list(LEXICON[c]) for c in (categories or LEXICON)}
        for category, patterns in dict(extra_patterns or {}).items():
            chosen.setdefault(str(category), []).extend(patterns)
        # category -> [[regex, ...], ...]: flagged when every regex of some group matches
        self.patterns = {}
        for category, patterns in chosen.items():
            single = [p for p in patterns if isinstance(p, str)]
            groups = [[re.compile(p, re.IGNORECASE) for p in group] for group in patterns if not isinstance(group, str)]
            if single:
                groups.append([re.compile("|".join(f"(?:{p})" for p in single), re.IGNORECASE)])
            if groups:
                self.patterns[category] = groups
        self.triggers = {c: TRIGGERS.get(c) for c in self.patterns if c not in dict(extra_patterns or {})}

    def screen_texts(self, texts: list[str]) -> list[list[str]]:
        return [self._categories(text) for text in texts]

    def _categories(self, text: str) -> list[str]:
        lowered = text.lower()
        return [c for c, groups in self.patterns.items()
                if _triggered(self.triggers.get(c), lowered)
                and any(all(r.search(text) for r in group) for group in groups)]


class ClassifierScreen(Screen):
    """The hook for a classifier model: `classifier(texts) -> [{category: score}]`."""

    name = "classifier"

    def __init__(self, classifier: Callable[[list[str]], list[dict]], action: str = "warn",
                 threshold: float = 0.5, batch_size: int = 32):
        super().__init__(action)
        self.classifier = classifier
        self.threshold = float(threshold)
        self.batch_size = int(batch_size)

    def screen_texts(self, texts: list[str]) -> list[list[str]]:
        flagged = []
        for start in range(0, len(texts), self.batch_size):
            batch = texts[start:start + self.batch_size]
            scores = self.classifier(batch)
            if len(scores) != len(batch):
                raise ValueError(f"moderation classifier returned {len(scores)} results for {len(batch)} texts")
            flagged += [sorted(c for c, s in row.items() if s >= self.threshold) for row in scores]
        return flagged


def lexicon_scores(texts: list[str]) -> list[dict]:
    """A stand-in classifier (score 1.0 per lexicon category hit) showing ClassifierScreen's contract."""
    screen = LexiconScreen(action="warn")
    return [{c: 1.0 for c in row} for row in screen.screen_texts(texts)]


def example_texts(example: Any) -> list[str]:
    """The strings of an example that are screened: message contents and names, or prompt and completion."""
    if not isinstance(example, dict):
        return []
    texts = [example[k] for k in ("prompt", "completion") if isinstance(example.get(k), str)]
    messages = example.get("messages")
    if isinstance(messages, list):
        for message in messages:
            if isinstance(message, dict):
                texts += [message[k] for k in ("content", "name") if isinstance(message.get(k), str)]
    return texts


@dataclass
class ModerationReport:
    """Flagged lines per file, what was done about them, and where dropped examples went."""

    screen: str
    action: str
    flagged: list = field(default_factory=list)  # [{"file", "kind", "line", "categories"}]
    screened_files: dict = field(default_factory=dict)  # kind -> Path of the file with flagged lines removed
    dropped_file: Optional[Path] = None

    @property
    def by_category(self) -> dict:
        return dict(Counter(c for f in self.flagged for c in f["categories"]))

    def summary(self) -> dict:
        return {
            "screen": self.screen,
            "action": self.action,
            "n_flagged": len(self.flagged),
            "by_category": self.by_category,
            "dropped_file": str(self.dropped_file) if self.dropped_file else None,
            "screened_files": {k: str(v) for k, v in self.screened_files.items()},
        }

    def to_json(self) -> dict:
        return {**self.summary(), "flagged": self.flagged}


def screens_anything(screen: Screen) -> bool:
    """Whether `screen` looks at the data at all (its action is not `off`)."""
    return _action(screen.action) != "off"


class FileScreen:
    """Screens one file's examples as a reading pass hands them over (`add`), in batches; `flagged()`
    returns (line, categories, example) for each flagged one. The validator's pass feeds it, so the
    file is read once for both."""

    def __init__(self, screen: Screen):
        self.screen = screen
        self.batch: list[tuple[int, Any]] = []
        self.hits: list[tuple[int, list[str], Any]] = []

    def add(self, line: int, example: Any) -> None:
        self.batch.append((line, example))
        if len(self.batch) >= BATCH_SIZE:
            self._flush()

    def _flush(self) -> None:
        for (line, example), categories in zip(self.batch, self.screen.screen_examples([e for _, e in self.batch])):
            if categories:
                self.hits.append((line, categories, example))
        self.batch.clear()

    def flagged(self) -> list[tuple[int, list[str], Any]]:
        self._flush()
        return self.hits


def screen_file(screen: Screen, path: Path) -> list[tuple[int, list[str], Any]]:
    """(line, categories, example) for each flagged example of a file read on its own; unparseable lines are skipped."""
    collector = FileScreen(screen)
    for line, example, error in iter_jsonl(path):
        if error is None:
            collector.add(line, example)
    return collector.flagged()


def _write_without(path: Path, lines: set, out: Path) -> Path:
    """Copy `path` to `out` without the given line numbers (and without blank lines, BOM, CR)."""
    with open(path, "rb") as src, atomic_writer(out, "wb") as dst:
        for number, raw in enumerate(src, 1):
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            raw = raw.strip()
            if raw and number not in lines:
                dst.write(raw + b"\n")
    return out


def screen_files(screen: Screen, files: dict, run_dir: Path, hits: Optional[dict] = None) -> ModerationReport:
    """Screen {kind: path} files, apply the action, and write moderation.json in `run_dir`.

    `hits` {kind: FileScreen.flagged()} are the findings of a pass that already read the files
    (the validator's); a file without them is read and screened here.

    With action `drop`, each file with flagged lines is rewritten without them to
    `<run_dir>/<kind>.screened.jsonl` and the flagged examples go to
    `<run_dir>/moderation.dropped.jsonl`.
    """
    run_dir = Path(run_dir)
    report = ModerationReport(getattr(screen, "name", type(screen).__name__), _action(screen.action))
    if report.action == "off":
        return report
    dropped = []
    for kind, path in files.items():
        found = hits[kind] if hits and kind in hits else screen_file(screen, Path(path))
        for line, categories, example in found:
            report.flagged.append({"file": str(path), "kind": kind, "line": line, "categories": categories})
            dropped.append({"file": str(path), "line": line, "categories": categories, "example": example})
        if report.action == "drop" and found:
            report.screened_files[kind] = _write_without(
                Path(path), {line for line, _, _ in found}, run_dir / f"{kind}.screened.jsonl")
    if report.action == "drop" and dropped:
        report.dropped_file = run_dir / "moderation.dropped.jsonl"
        with atomic_writer(report.dropped_file) as handle:
            for row in dropped:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    write_json(run_dir / "moderation.json", report.to_json())
    return report


def flagged_issues(report: ModerationReport) -> list[tuple[str, int, str]]:
    """(file, line, message) per flagged example, for validation.json."""
    verb = {"warn": "kept (moderation.action=warn)", "drop": "dropped from training (moderation.action=drop)",
            "fail": "refused (moderation.action=fail)"}.get(report.action, "")
    return [(f["file"], f["line"], f"flagged for {', '.join(f['categories'])}: {verb} — review or remove the example")
            for f in report.flagged]

