"""Tokenize once: a tokenized data file is kept under ``<cache_dir>/tokenized/``, keyed by the
file's bytes, the tokenizer (vocabulary, special tokens, chat template), the format, max_length
and the tokenization code itself (tokenize.py, and tools.py's rendering of function calls), so a
re-run, a resume or every job of a sweep skips parsing and tokenizing. Any change to one of those
gives a new key; an unreadable entry is rebuilt."""
import hashlib
import json
from pathlib import Path

import torch

from trainer.data import tokenize, tools
from trainer.data.jsonl import load_examples
from trainer.data.tokenize import TokenizedDataset, TokenizedExample, tokenize_examples
from trainer.files import atomic_writer, sha256_of


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of everything in the tokenizer that decides the token ids of a rendered example."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocabulary = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    parts = [vocabulary, tokenizer.chat_template or "", str(tokenizer.eos_token_id), str(tokenizer.bos_token_id)]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def cache_key(path: Path, tokenizer, chat: bool, max_length: int) -> str:
    """The cache entry's name for this file tokenized this way."""
    code = hashlib.sha256(b"".join(Path(m.__file__).read_bytes() for m in (tokenize, tools))).hexdigest()
    parts = [sha256_of(path), tokenizer_fingerprint(tokenizer), code, "chat" if chat else "prompt", str(max_length)]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:32]


def save_dataset(dataset: TokenizedDataset, path: Path) -> None:
    """Write the dataset as a few flat tensors (loadable with ``weights_only=True``), atomically."""
    lengths = [len(e.input_ids) for e in dataset.examples]
    state = {
        "input_ids": torch.tensor([t for e in dataset.examples for t in e.input_ids], dtype=torch.int32),
        "labels": torch.tensor([t for e in dataset.examples for t in e.labels], dtype=torch.int32),
        "lengths": torch.tensor(lengths, dtype=torch.int64),
        "truncated": torch.tensor([e.truncated for e in dataset.examples], dtype=torch.bool),
        "n_truncated": dataset.n_truncated,
        "n_dropped": dataset.n_dropped,
        "dropped_lines": list(dataset.dropped_lines),
    }
    with atomic_writer(path, "wb") as handle:
        torch.save(state, handle)


def load_dataset(path: Path) -> TokenizedDataset | None:
    """The cached dataset, or None when the entry is missing or unreadable."""
    try:
        state = torch.load(path, weights_only=True)
        lengths = state["lengths"].tolist()
        input_ids = state["input_ids"].split(lengths)
        labels = state["labels"].split(lengths)
        truncated = state["truncated"].tolist()
    except Exception:  # noqa: BLE001 - missing, truncated or from another layout: rebuild it
        return None
    examples = [TokenizedExample(ids.tolist(), lab.tolist(), cut) for ids, lab, cut in zip(input_ids, labels, truncated)]
    return TokenizedDataset(examples, state["n_truncated"], state["n_dropped"], list(state["dropped_lines"]))


def tokenize_file(path: Path, tokenizer, chat: bool, max_length: int,
                  cache_dir: Path | None) -> tuple[TokenizedDataset, bool]:
    """The file tokenized, from the cache when it holds it; returns (dataset, whether it was cached).

    With `cache_dir` None the file is always tokenized and nothing is stored.
    """
    entry = Path(cache_dir) / "tokenized" / f"{cache_key(path, tokenizer, chat, max_length)}.pt" if cache_dir else None
    if entry is not None and entry.exists() and (cached := load_dataset(entry)) is not None:
        return cached, True
    dataset = tokenize_examples(load_examples(path), tokenizer, chat=chat, max_length=max_length)
    if entry is not None:
        save_dataset(dataset, entry)
    return dataset, False
