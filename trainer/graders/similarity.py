"""The text graders: `string_check` (exact and contains checks) and `text_similarity` (metrics from
well-kept libraries: rapidfuzz, nltk's BLEU, GLEU and METEOR, Google's rouge-score).

- `eq` / `ne`: the input equals / differs from the reference, exactly; `like`: the input contains
  the reference; `ilike`: the same ignoring case (the hosted graders guide's definitions). 1 or 0.
- `fuzzy_match`: rapidfuzz's normalised Levenshtein ratio; `bleu` and `gleu`: sentence scores on
  word tokens (BLEU smoothed and reweighted for short texts, so identical texts score 1); `meteor`:
  exact and stem matches (WordNet's synonyms would need a download, so none offline); `rouge_1` …
  `rouge_5` and `rouge_l`: F-measures; `cosine`: the embeddings of a local model
  (`graders.embedding_model`, mean-pooled), refused when none is configured. Scores in [0, 1].
"""
import re
from functools import lru_cache
from typing import Optional

OPERATIONS = ("eq", "ne", "like", "ilike")
METRICS = ("cosine", "fuzzy_match", "bleu", "gleu", "meteor", "rouge_1", "rouge_2", "rouge_3", "rouge_4", "rouge_5",
           "rouge_l")
WORD = re.compile(r"\w+|[^\w\s]")


def string_check(operation: str, text: str, reference: str) -> float:
    """1.0 when `text` passes the check against `reference`, else 0.0."""
    passed = {"eq": text == reference, "ne": text != reference, "like": reference in text,
              "ilike": reference.casefold() in text.casefold()}[operation]
    return float(passed)


class _NoWordNet:
    """METEOR's synonym source, empty: exact and stem matches only (WordNet's data is a download)."""

    @staticmethod
    def synsets(*args, **kwargs) -> list:
        return []


@lru_cache(maxsize=8)
def _rouge(metric: str):
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer([metric.replace("_", "").replace("rougel", "rougeL")])


def similarity(metric: str, text: str, reference: str, embedding_model: Optional[str] = None) -> float:
    """`text`'s similarity to `reference` by `metric` (one of METRICS), in [0, 1]."""
    if metric == "fuzzy_match":
        from rapidfuzz import fuzz

        return fuzz.ratio(text, reference) / 100
    if metric.startswith("rouge_"):
        (score,) = _rouge(metric).score(reference, text).values()
        return float(score.fmeasure)
    if metric == "cosine":
        if not embedding_model:
            raise ValueError("cosine needs an embedding model: set graders.embedding_model to a local folder")
        first, second = embed(embedding_model, (text, reference))
        return max(0.0, float(first @ second))
    words, reference_words = WORD.findall(text), WORD.findall(reference)
    if not words or not reference_words:
        return float(words == reference_words)
    if metric == "bleu":
        from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

        return float(sentence_bleu([reference_words], words, smoothing_function=SmoothingFunction().method1,
                                   auto_reweigh=True))
    if metric == "gleu":
        from nltk.translate.gleu_score import sentence_gleu

        return float(sentence_gleu([reference_words], words))
    if metric == "meteor":
        from nltk.translate.meteor_score import meteor_score

        return float(meteor_score([reference_words], words, wordnet=_NoWordNet()))
    raise ValueError(f"unknown evaluation_metric {metric!r}: use one of {', '.join(METRICS)}")


@lru_cache(maxsize=2)
def _embedder(folder: str):
    from transformers import AutoModel, AutoTokenizer

    return AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder).eval()


def embed(folder: str, texts: tuple[str, ...]):
    """Unit-length embeddings of `texts` by the model in `folder`: its last hidden states, mean-pooled."""
    import torch

    tokenizer, model = _embedder(folder)
    batch = tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt")
    with torch.inference_mode():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"][..., None].to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1)
    return torch.nn.functional.normalize(pooled.float(), dim=-1)
