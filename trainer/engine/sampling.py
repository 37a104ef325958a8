"""How each row of a batch picks its next token: the hosted API's sampling parameters, per row.

Every row carries its own parameters and its own random generator, so a seeded request draws
the same tokens whatever else shares its batch. Greedy rows (temperature 0) take the argmax;
the others sample from softmax(logits / temperature), cut to the nucleus of mass `top_p`.
Presence and frequency penalties count the tokens the row generated so far; a call constraint
(`trainer.call_constraint.CallConstraint`) rules out every token it does not allow. Log-probs are
the model's own (log-softmax of the raw logits, before penalties, temperature or constraints),
as the hosted API reports them.
"""
from dataclasses import dataclass, field
from typing import Optional

import torch

MAX_TOP_LOGPROBS = 20  # the hosted chat API's limit


@dataclass
class Sampling:
    """How one request samples: the hosted API's parameters (temperature 0 is greedy)."""

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1  # choices: n rows that share the prompt's prefill
    seed: Optional[int] = None  # choice i draws from a generator seeded with (seed, i); None: a fresh seed
    stop: tuple[str, ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: bool = False  # report each generated token's log-prob
    top_logprobs: int = 0  # and this many most likely alternatives (0 to MAX_TOP_LOGPROBS)

    @property
    def greedy(self) -> bool:
        return not self.temperature or self.temperature <= 0


@dataclass
class TokenLogprob:
    """A generated token's log-prob under the model, and the most likely tokens at its position."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


def row_generator(sampling: Sampling, choice: int, device) -> Optional[torch.Generator]:
    """The random generator of one choice: None when greedy; seeded from (seed, choice) when a seed is given."""
    if sampling.greedy:
        return None
    generator = torch.Generator(device=device)
    if sampling.seed is None:
        generator.seed()
    else:  # distinct, reproducible streams for the n choices of one seed
        generator.manual_seed((int(sampling.seed) * 1_000_003 + choice) & 0xFFFF_FFFF_FFFF_FFFF)
    return generator


class RowSampler:
    """The sampling state of one row: its parameters, generator and the counts its penalties need."""

    def __init__(self, sampling: Sampling, choice: int, device, constraint=None):
        self.sampling = sampling
        self.generator = row_generator(sampling, choice, device)
        self.constraint = constraint
        self.counts: dict[int, int] = {}  # token id → times generated (penalties only)

    @property
    def penalised(self) -> bool:
        return bool(self.sampling.presence_penalty or self.sampling.frequency_penalty)

    def took(self, token: int) -> None:
        """Record a generated token (for the penalties)."""
        if self.penalised:
            self.counts[token] = self.counts.get(token, 0) + 1


def _penalise(logits: torch.Tensor, sampling: Sampling, counts: dict[int, int]) -> torch.Tensor:
    if not counts:
        return logits
    ids = torch.tensor(list(counts), device=logits.device)
    times = torch.tensor(list(counts.values()), dtype=logits.dtype, device=logits.device)
    penalty = sampling.frequency_penalty * times + sampling.presence_penalty
    return logits.index_add(0, ids, -penalty)


def _allow_only(logits: torch.Tensor, allowed: list[int]) -> torch.Tensor:
    kept = torch.full_like(logits, float("-inf"))
    index = torch.tensor([i for i in allowed if i < logits.shape[0]], dtype=torch.long, device=logits.device)
    return kept.index_copy_(0, index, logits.index_select(0, index))


def _sample(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator) -> int:
    probs = torch.softmax(logits / float(sampling.temperature), dim=-1)
    if sampling.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        before = sorted_probs.cumsum(0) - sorted_probs  # the mass of the tokens ranked above each one
        sorted_probs = sorted_probs.masked_fill(before >= float(sampling.top_p), 0.0)
        sorted_probs[0] = sorted_probs[0].clamp_min(1e-12)  # the most likely token always stays
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return draw(probs, generator)


def draw(probs: torch.Tensor, generator: torch.Generator) -> int:
    """One token from `probs` (unnormalised weights), with one uniform number from the row's generator: the first
    token whose cumulative weight passes it. torch.multinomial draws an exponential number for every token of
    the vocabulary instead, ~0.9 ms a call over 49k tokens here against ~0.05 ms."""
    cumulative = probs.cumsum(0)
    target = torch.rand((), generator=generator, dtype=cumulative.dtype, device=cumulative.device) * cumulative[-1]
    token = min(int(torch.searchsorted(cumulative, target, right=True)), probs.shape[0] - 1)
    return token if probs[token] > 0 else int(probs.argmax())  # the rounding of a last, empty bucket


def choose_tokens(logits: torch.Tensor, rows: list[RowSampler], generated: list[list[int]]
                  ) -> tuple[list[int], list[Optional[TokenLogprob]]]:
    """The next token of every row from its last position's logits `[rows, vocab]`, and its log-prob
    where the row asked for them. `generated[i]`: the tokens row i generated so far (for its constraint)."""
    logits = logits.float()
    tokens = logits.argmax(dim=-1).tolist()  # every greedy row without penalties or constraint, in one call
    for i, row in enumerate(rows):
        allowed = row.constraint.allowed(generated[i]) if row.constraint is not None else None
        if row.sampling.greedy and not row.penalised and allowed is None:
            continue
        scores = _penalise(logits[i], row.sampling, row.counts)
        if allowed is not None:
            scores = _allow_only(scores, allowed)
        tokens[i] = int(scores.argmax()) if row.sampling.greedy else _sample(scores, row.sampling, row.generator)
    logprobs: list[Optional[TokenLogprob]] = [None] * len(rows)
    wanted = [i for i, row in enumerate(rows) if row.sampling.logprobs]
    if wanted:
        log_probs = torch.log_softmax(logits[wanted], dim=-1)
        for j, i in enumerate(wanted):
            top = []
            if rows[i].sampling.top_logprobs:
                values, ids = log_probs[j].topk(min(rows[i].sampling.top_logprobs, MAX_TOP_LOGPROBS))
                top = list(zip(ids.tolist(), values.tolist()))
            logprobs[i] = TokenLogprob(tokens[i], float(log_probs[j, tokens[i]]), top)
    for token, row in zip(tokens, rows):
        row.took(token)
    return tokens, logprobs
