"""Tokenize once: a tokenized data file is kept under ``<cache_dir>/tokenized/``, keyed by the
file's bytes, the tokenizer (vocabulary, special tokens, chat template), the format, max_length
and the tokenization code itself (tokenize.py, and tools.py's rendering of function calls), so a
re-run, a resume or every job of a sweep skips parsing and tokenizing. Any change to one of those
gives a new key; an unreadable entry is rebuilt.

Preference pairs (`trainer.data.pairs`) are kept the same way, and beside their entry the reference
model's log-probs of both outputs of every pair (`<entry>.reference-<model key>.pt`), computed once
before training: a second epoch, a resume or a second job from the same starting model reads them back."""
import hashlib
import json
from pathlib import Path

import torch

from trainer.data import pairs, tokenize, tools
from trainer.data.jsonl import load_examples
from trainer.data.pairs import PairDataset, TokenizedPair, tokenize_pairs
from trainer.data.tokenize import TokenizedDataset, TokenizedExample, tokenize_examples
from trainer.files import atomic_writer, sha256_of


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of everything in the tokenizer that decides the token ids of a rendered example."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocabulary = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    parts = [vocabulary, tokenizer.chat_template or "", str(tokenizer.eos_token_id), str(tokenizer.bos_token_id)]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def cache_key(path: Path, tokenizer, chat: bool, max_length: int, kind: str | None = None) -> str:
    """The cache entry's name for this file tokenized this way (`kind`: chat | prompt | preference)."""
    kind = kind or ("chat" if chat else "prompt")
    modules = (tokenize, tools, pairs) if kind == "preference" else (tokenize, tools)
    code = hashlib.sha256(b"".join(Path(m.__file__).read_bytes() for m in modules)).hexdigest()
    parts = [sha256_of(path), tokenizer_fingerprint(tokenizer), code, kind, str(max_length)]
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


def save_pairs(dataset: PairDataset, path: Path) -> None:
    """Write tokenized pairs as flat tensors (loadable with ``weights_only=True``), atomically."""
    parts = [(p.prompt_ids, p.chosen_ids, p.rejected_ids) for p in dataset.pairs]
    state = {
        "ids": torch.tensor([t for pair in parts for ids in pair for t in ids], dtype=torch.int32),
        "lengths": torch.tensor([[len(ids) for ids in pair] for pair in parts], dtype=torch.int64).reshape(-1, 3),
        "truncated": torch.tensor([p.truncated for p in dataset.pairs], dtype=torch.bool),
        "n_truncated": dataset.n_truncated,
        "n_dropped": dataset.n_dropped,
        "dropped_lines": list(dataset.dropped_lines),
    }
    with atomic_writer(path, "wb") as handle:
        torch.save(state, handle)


def load_pairs(path: Path) -> PairDataset | None:
    """The cached pairs, or None when the entry is missing or unreadable."""
    try:
        state = torch.load(path, weights_only=True)
        pieces = state["ids"].split(state["lengths"].flatten().tolist())
        truncated = state["truncated"].tolist()
    except Exception:  # noqa: BLE001 - missing, truncated or from another layout: rebuild it
        return None
    pairs = [TokenizedPair(*(piece.tolist() for piece in pieces[3 * i : 3 * i + 3]), cut)
             for i, cut in enumerate(truncated)]
    return PairDataset(pairs, state["n_truncated"], state["n_dropped"], list(state["dropped_lines"]))


def tokenize_pairs_file(path: Path, tokenizer, max_length: int, cache_dir: Path | None) -> tuple[PairDataset, bool]:
    """A preference file tokenized, from the cache when it holds it; returns (pairs, whether they were cached)."""
    entry = (Path(cache_dir) / "tokenized" / f"{cache_key(path, tokenizer, True, max_length, 'preference')}.pt"
             if cache_dir else None)
    dataset = load_pairs(entry) if entry is not None and entry.exists() else None
    cached = dataset is not None
    if dataset is None:
        dataset = tokenize_pairs(load_examples(path), tokenizer, max_length)
        if entry is not None:
            save_pairs(dataset, entry)
    dataset.cache_entry = str(entry) if entry is not None else None
    return dataset, cached


def reference_path(dataset: PairDataset, model_key: str) -> Path | None:
    """Where the reference log-probs of `dataset` under the model `model_key` names are kept (None: no cache)."""
    if dataset.cache_entry is None:
        return None
    entry = Path(dataset.cache_entry)
    return entry.with_name(f"{entry.stem}.reference-{model_key[:32]}.pt")


def load_reference(dataset: PairDataset, model_key: str) -> torch.Tensor | None:
    """The kept reference log-probs ((pairs, 2), fp32), or None when there are none (or they do not fit)."""
    path = reference_path(dataset, model_key)
    try:
        reference = torch.load(path, weights_only=True) if path is not None and path.exists() else None
    except Exception:  # noqa: BLE001 - unreadable: computed again
        return None
    return reference if reference is not None and reference.shape == (len(dataset.pairs), 2) else None


def save_reference(dataset: PairDataset, model_key: str, reference: torch.Tensor) -> None:
    """Keep the reference log-probs beside the dataset's cache entry (nothing without a cache)."""
    path = reference_path(dataset, model_key)
    if path is not None:
        with atomic_writer(path, "wb") as handle:
            torch.save(reference.cpu(), handle)
