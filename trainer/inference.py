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
    render_messages,
    tokens_extending,
)
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
def encode_chat_prompt(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a conversation up to the assistant's turn, built as training builds them."""
    ids, rendered = [], ""
    for index in range(len(messages)):
        text = render_messages(tokenizer, messages[: index + 1])
        ids += tokens_extending(tokenizer, rendered, text)
        rendered = text
    header = render_messages(tokenizer, messages, add_generation_prompt=True)
    return ids + tokens_extending(tokenizer, rendered, header)


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


def stream_reply(loaded: LoadedModel, prompt_ids: list[int], gen: DictConfig, out=None) -> str:
    """Generate one reply, writing tokens to `out` as they come; returns the reply (stop strings cut)."""
    from transformers import TextIteratorStreamer

    out = out or sys.stdout
    streamer = TextIteratorStreamer(loaded.tokenizer, skip_prompt=True, skip_special_tokens=True)
    kwargs = _generate_kwargs(loaded, gen.max_new_tokens, gen.temperature, gen.top_p)
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
