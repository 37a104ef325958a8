"""Using a job's model as a library: load it (backbone + adapter, with the tokenizer and chat
template saved with the job), encode prompts exactly as training encoded them, and generate
(batched, or streamed, with stop sequences). `ftlab chat`, `ftlab complete`, `ftlab eval` and
`ftlab export` build on it.

The prompt is tokenized exactly as training tokenized the context before a reply: the job's own
tokenizer and chat template (saved in `adapter/`), rendered message by message, no special
tokens added; prompt/completion prompts are the raw prompt text. A reply stops at the
template's end-of-turn token (what training supervised), at EOS, or at `generation.stop`.
"""
import os
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from omegaconf import DictConfig

from trainer.data.tokenize import (  # the renderer training uses
    encode_conversation,
    render_messages,
)
from trainer.data.tools import as_tools
from trainer.jobs import (
    JobNotFound,
    JobRef,
    load_job_config,
    require_adapter,
    resolve_job,
)
from trainer.schema import DataFormat

BASE = "base"  # job=base: the configured backbone, no job


@dataclass
class LoadedModel:
    """A model ready to generate, with the tokenizer and template its job trained with."""

    cfg: DictConfig  # the job's config (the command's generation/eval settings on top)
    model: torch.nn.Module  # backbone, or PeftModel(backbone, adapter)
    tokenizer: object
    label: str  # ft:… name, or the backbone's name
    job: Optional[JobRef] = None
    stop_token_ids: list[int] = field(default_factory=list)

    @property
    def chat(self) -> bool:
        return self.cfg.model.format == DataFormat.chat

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def open_job(command_cfg: DictConfig, overrides: tuple[str, ...] = ()) -> tuple[DictConfig, Optional[JobRef]]:
    """The config and job a using command works on: `job=base` is the command's own backbone."""
    reference = command_cfg.job
    if not reference:
        raise JobNotFound("say which model: job=<ftjob-… | ft:… | run dir | latest> (or job=base for the backbone "
                          "alone); `ftlab jobs list` shows the jobs")
    if str(reference) == BASE:
        return command_cfg, None
    job = resolve_job(reference, command_cfg.jobs_root)
    return load_job_config(job, command_cfg, overrides), job


def load_job_tokenizer(cfg: DictConfig, job: Optional[JobRef]):
    """The tokenizer (and chat template) saved with the job's adapter; the backbone's for job=base."""
    from transformers import AutoTokenizer

    from trainer.model import load_tokenizer

    saved = job.run_dir / "adapter" if job is not None else None
    if saved is not None and (saved / "tokenizer_config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(str(saved))
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
    else:
        tokenizer = load_tokenizer(cfg)
    return tokenizer


def end_of_turn_ids(tokenizer, chat: bool) -> list[int]:
    """EOS, plus the special token the chat template closes a reply with (ChatML's <|im_end|>)."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if chat:
        probe = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
        full = render_messages(tokenizer, probe)
        head = render_messages(tokenizer, probe[:1], add_generation_prompt=True)
        after = full[len(head):].split("y", 1)[-1] if full.startswith(head) else ""
        after_ids = tokenizer(after, add_special_tokens=False)["input_ids"] if after else []
        if after_ids and tokenizer.convert_ids_to_tokens(after_ids[0]) in tokenizer.get_added_vocab():
            ids.append(after_ids[0])
    return list(dict.fromkeys(ids))


def load_model(cfg: DictConfig, job: Optional[JobRef], use_adapter: bool = True, console=None) -> LoadedModel:
    """Backbone (+ the job's adapter) in eval mode, with the job's tokenizer and stop tokens."""
    from trainer.model import load_for_inference

    adapter_dir = require_adapter(job).adapter_dir if job is not None and use_adapter else None
    tokenizer = load_job_tokenizer(cfg, job)
    model = load_for_inference(cfg, adapter_dir)
    if job is not None and use_adapter:
        label = job.name
    else:
        label = f"{cfg.backbone.name} (no adapter)" if job is not None else cfg.backbone.name
    loaded = LoadedModel(cfg, model, tokenizer, label, job,
                         end_of_turn_ids(tokenizer, cfg.model.format == DataFormat.chat))
    if console is not None:
        console.print(f"[dim]{label}: {cfg.backbone.name}"
                      f"{' + adapter ' + str(adapter_dir) if adapter_dir else ''}[/]", highlight=False)
    return loaded


# ---- prompts ---------------------------------------------------------------------------------
def encode_chat_prompt(tokenizer, messages: list[dict], tools: Optional[list] = None) -> list[int]:
    """Token ids of a conversation up to the assistant's turn, built as training builds them.

    `tools`: the functions the model may call, as the API's `tools` list or the legacy `functions`
    list (None or [] for none). Messages may carry calls (`tool_calls` or `function_call`) and
    results (`tool` / `function` messages), in either format; they render as training rendered them.
    """
    ids, _ = encode_conversation(tokenizer, messages, as_tools(tools), add_generation_prompt=True)
    return ids


def encode_completion_prompt(tokenizer, prompt: str) -> list[int]:
    """Token ids of a prompt/completion prompt: the raw text, as in training."""
    return tokenizer(prompt, add_special_tokens=False)["input_ids"]


def training_prompt_suffix(job: Optional[JobRef], limit: int = 200) -> str:
    """The separator every training prompt ends with (e.g. "\\n\\n###\\n\\n"), or "" if there is none."""
    from trainer.data.jsonl import load_examples

    path = ((job.record.get("training_file") or {}).get("path") if job else None)
    if not path or not Path(path).is_file():
        return ""
    prompts = [example.get("prompt", "") for _, example in load_examples(path)[:limit] if isinstance(example, dict)]
    if not prompts:
        return ""
    suffix = os.path.commonprefix([p[::-1] for p in prompts])[::-1]
    if len(suffix) >= min(len(p) for p in prompts):
        return ""  # a prompt is all suffix: there is no separator to speak of
    # similar prompts share more than the separator; a separator starts at a line break when it has one
    return suffix[suffix.index("\n"):] if "\n" in suffix else suffix


# ---- generation ------------------------------------------------------------------------------
def _cut_at_stop(text: str, stop: list[str]) -> str:
    cuts = [text.index(s) for s in stop if s and s in text]
    return text[: min(cuts)] if cuts else text


def _generate_kwargs(loaded: LoadedModel, max_new_tokens: int, temperature: float, top_p: float) -> dict:
    kwargs = dict(max_new_tokens=max_new_tokens, eos_token_id=loaded.stop_token_ids or None,
                  pad_token_id=loaded.tokenizer.pad_token_id)
    if temperature and temperature > 0:
        kwargs |= dict(do_sample=True, temperature=float(temperature), top_p=float(top_p))
    else:
        kwargs |= dict(do_sample=False, temperature=None, top_p=None, top_k=None)
    return kwargs


@torch.no_grad()
def generate_batch(loaded: LoadedModel, prompts: list[list[int]], *, max_new_tokens: int, temperature: float = 0.0,
                   top_p: float = 1.0, stop: list[str] = (), batch_size: int = 8) -> list[dict]:
    """Replies to tokenized prompts, generated `batch_size` at a time with left padding.

    Returns one `{"text", "n_tokens"}` per prompt (n_tokens: generated backbone tokens, stop token excluded).
    """
    results = []
    pad = loaded.tokenizer.pad_token_id
    kwargs = _generate_kwargs(loaded, max_new_tokens, temperature, top_p)
    stop_ids = set(loaded.stop_token_ids)
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        width = max(len(p) for p in chunk)
        input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, ids in enumerate(chunk):
            input_ids[row, width - len(ids):] = torch.tensor(ids)
            attention_mask[row, width - len(ids):] = 1
        output = loaded.model.generate(input_ids=input_ids.to(loaded.device),
                                       attention_mask=attention_mask.to(loaded.device), **kwargs)
        for row in output[:, width:].tolist():
            kept = []
            for token in row:
                if token in stop_ids:
                    break
                kept.append(token)
            text = _cut_at_stop(loaded.tokenizer.decode(kept, skip_special_tokens=True), list(stop))
            results.append({"text": text, "n_tokens": len(kept)})
    return results


def stream_reply(loaded: LoadedModel, prompt_ids: list[int], gen: DictConfig, out=None, constraint=None) -> str:
    """Generate one reply, writing tokens to `out` as they come; returns the reply (stop strings cut).
    A `constraint` (`trainer.call_constraint.CallConstraint`) limits each next token to those it allows."""
    from transformers import TextIteratorStreamer

    out = out or sys.stdout
    streamer = TextIteratorStreamer(loaded.tokenizer, skip_prompt=True, skip_special_tokens=True)
    kwargs = _generate_kwargs(loaded, gen.max_new_tokens, gen.temperature, gen.top_p)
    if constraint is not None:
        every_token = list(range(len(loaded.tokenizer)))
        kwargs["prefix_allowed_tokens_fn"] = lambda row, ids: (
            constraint.allowed(ids[len(prompt_ids):].tolist()) or every_token)
    input_ids = torch.tensor([prompt_ids], device=loaded.device)
    errors = []

    def run():
        try:
            with torch.no_grad():
                loaded.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                      streamer=streamer, **kwargs)
        except Exception as error:  # noqa: BLE001 - re-raised in the caller's thread
            errors.append(error)
            streamer.end()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    text, shown = "", 0
    stop = list(gen.stop or [])
    for piece in streamer:
        text += piece
        visible = _cut_at_stop(text, stop)
        out.write(visible[shown:])
        out.flush()
        shown = len(visible)
        if len(visible) < len(text):
            break  # a stop string: stop printing (generation ends on its own shortly)
    thread.join()
    if errors:
        raise errors[0]
    out.write("\n")
    out.flush()
    return _cut_at_stop(text, stop)


# ---- token-level sampling (ftlab serve) ------------------------------------------------------
@dataclass
class Sampling:
    """How one request samples: the hosted API's parameters (temperature 0 is greedy)."""

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1  # choices, sampled together as the rows of one batch (they share the prompt)
    seed: Optional[int] = None  # the same seed gives the same choices; None: a fresh one
    stop: tuple[str, ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0


@dataclass
class Delta:
    """Text one choice adds; `finish_reason` ("stop" | "length") and `n_tokens` are set on its last delta."""

    index: int
    text: str
    finish_reason: Optional[str] = None
    n_tokens: int = 0


def _next_tokens(logits: torch.Tensor, sampling: Sampling, generator: Optional[torch.Generator],
                 counts: Optional[torch.Tensor]) -> torch.Tensor:
    """One token per row from the last position's logits: argmax at temperature 0, else nucleus sampling."""
    logits = logits.float()
    if counts is not None:  # the hosted API's penalties, on the tokens each row generated so far
        logits = logits - sampling.frequency_penalty * counts - sampling.presence_penalty * (counts > 0).float()
    if not sampling.temperature or sampling.temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / float(sampling.temperature), dim=-1)
    if sampling.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass of the tokens ranked above each one
        sorted_probs = sorted_probs.masked_fill(before >= float(sampling.top_p), 0.0)
        sorted_probs[:, 0] = sorted_probs[:, 0].clamp_min(1e-12)  # the most likely token always stays
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _constrained(logits: torch.Tensor, allowed: list[Optional[list[int]]]) -> torch.Tensor:
    """`logits` with every token but the allowed ones ruled out, in each row that has a list."""
    if all(ids is None for ids in allowed):
        return logits
    logits = logits.clone()
    for row, ids in enumerate(allowed):
        if ids is not None:
            keep = logits[row, ids]
            logits[row] = float("-inf")
            logits[row, ids] = keep
    return logits


def _forward_arguments(model: torch.nn.Module) -> tuple[str, dict]:
    """The forward's KV-cache argument (`cache` in transformers 5.x, `past_key_values` before) and
    `logits_to_keep=1` where the model takes it (no full-vocabulary logits for every prompt position)."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    parameters = inspect.signature(base.forward).parameters
    return ("cache" if "cache" in parameters else "past_key_values"), (
        {"logits_to_keep": 1} if "logits_to_keep" in parameters else {})


@torch.no_grad()
def sample_steps(model: torch.nn.Module, prompt_ids: list[int], sampling: Sampling, stop_token_ids=(),
                 finished: Optional[set] = None, constraint=None):
    """Generate `sampling.n` continuations of one prompt, one step at a time, with a KV cache.

    Yields, per step, one entry per row: the new token id, or None for a row that has ended
    (at a stop token, which is not yielded, or because the caller added its index to `finished`).
    Ends when every row has ended or `max_new_tokens` steps were taken. Sampling draws from a
    generator seeded with `sampling.seed`, so the global RNG is left alone. A `constraint`
    (`trainer.call_constraint.CallConstraint`) limits each row's next token to those it allows.
    """
    device = next(model.parameters()).device
    n = sampling.n
    generator = None
    if sampling.temperature and sampling.temperature > 0:
        generator = torch.Generator(device=device)
        if sampling.seed is not None:
            generator.manual_seed(int(sampling.seed) & 0xFFFF_FFFF_FFFF_FFFF)
        else:
            generator.seed()
    finished = finished if finished is not None else set()
    stops = torch.tensor(sorted(set(stop_token_ids)) or [-1], device=device)
    penalties = bool(sampling.presence_penalty or sampling.frequency_penalty)
    counts = None
    input_ids = torch.tensor([prompt_ids] * n, dtype=torch.long, device=device)
    cache_arg, extra = _forward_arguments(model)
    past = None
    generated: list[list[int]] = [[] for _ in range(n)]
    for _ in range(sampling.max_new_tokens):
        output = model(input_ids=input_ids, use_cache=True, **{cache_arg: past}, **extra)
        past = getattr(output, "cache", None)
        past = past if past is not None else output.past_key_values
        logits = output.logits[:, -1, :]
        if constraint is not None:
            logits = _constrained(logits, [None if row in finished else constraint.allowed(ids)
                                           for row, ids in enumerate(generated)])
        if penalties and counts is None:
            counts = torch.zeros_like(logits, dtype=torch.float32)
        tokens = _next_tokens(logits, sampling, generator, counts)
        if counts is not None:
            counts.scatter_add_(1, tokens[:, None], torch.ones((n, 1), device=device))
        ended = torch.isin(tokens, stops).tolist()
        step = []
        for row, token in enumerate(tokens.tolist()):
            if row in finished or ended[row]:
                finished.add(row)
                step.append(None)
            else:
                step.append(token)
                generated[row].append(token)
        yield step
        if len(finished) >= n:
            return
        input_ids = tokens[:, None]


class TextStream:
    """A reply's text as its tokens come: decodes every id so far and hands out the new suffix.

    Text is held back while it ends in an incomplete UTF-8 character ("\\ufffd") or in the start
    of a stop string; a stop string ends the reply (cut before it). Streaming and non-streaming
    replies are built from the same deltas, so they are the same text.
    """

    def __init__(self, tokenizer, stop=()):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.sent = 0  # characters handed out
        self.stopped = False

    def _holdback(self, text: str) -> int:
        """Where the text that may still change (an incomplete character, a stop string's start) begins."""
        end = len(text)
        while end > self.sent and text[end - 1] == "\ufffd":
            end -= 1
        hold = 0
        for stop in self.stop:
            for size in range(min(len(stop) - 1, end - self.sent), hold, -1):
                if text[end - size: end] == stop[:size]:
                    hold = size
                    break
        return max(end - hold, self.sent)

    def push(self, token: int) -> str:
        """The text the token adds that is safe to show; after a stop string, `stopped` is set."""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if self.stop:
            start = max(0, self.sent - max(len(s) for s in self.stop))
            cuts = [i for i in (text.find(s, start) for s in self.stop) if i >= 0]
            if cuts:
                self.stopped = True
                cut = max(min(cuts), self.sent)
                delta, self.sent = text[self.sent: cut], cut
                return delta
        end = self._holdback(text)
        delta, self.sent = text[self.sent: end], end
        return delta

    def flush(self) -> str:
        """The rest of the text once the reply has ended (held-back characters included)."""
        if self.stopped:
            return ""
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        delta, self.sent = text[self.sent:], len(text)
        return delta


def generate_choices(model: torch.nn.Module, tokenizer, prompt_ids: list[int], sampling: Sampling,
                     stop_token_ids=(), cancelled=None, constraint=None):
    """`sampling.n` replies to one prompt as a stream of `Delta`s (text as it comes, then each choice's finish).

    `cancelled` (a threading.Event, optional) stops generation early: the choices still
    unfinished end without a finish delta. `constraint`: see `sample_steps`.
    """
    streams = [TextStream(tokenizer, sampling.stop) for _ in range(sampling.n)]
    counts = [0] * sampling.n
    done: set[int] = set()
    reported: set[int] = set()

    def finish(row: int, reason: str) -> Delta:
        reported.add(row)
        done.add(row)
        return Delta(row, streams[row].flush(), reason, counts[row])

    for step in sample_steps(model, prompt_ids, sampling, stop_token_ids, done, constraint):
        if cancelled is not None and cancelled.is_set():
            return
        for row, token in enumerate(step):
            if row in reported:
                continue
            if token is None:  # a stop token
                yield finish(row, "stop")
                continue
            counts[row] += 1
            text = streams[row].push(token)
            if streams[row].stopped:
                reported.add(row)
                done.add(row)
                yield Delta(row, text, "stop", counts[row])
            elif text:
                yield Delta(row, text)
    for row in range(sampling.n):
        if row not in reported:
            yield finish(row, "length")
