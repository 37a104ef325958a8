"""Using a job's model as a library: load it (backbone + adapter, with the tokenizer and chat
template saved with the job), encode prompts exactly as training encoded them, and generate
through the decoding engine (`trainer.engine`: many prompts batched, or one reply streamed, with
stop sequences). `ftlab chat`, `ftlab complete`, `ftlab eval` and `ftlab export` build on it.

The prompt is tokenized exactly as training tokenized the context before a reply: the job's own
tokenizer and chat template (saved in `adapter/`), rendered message by message, no special
tokens added; prompt/completion prompts are the raw prompt text. A reply stops at the
template's end-of-turn token (what training supervised), at EOS, or at `generation.stop`.
"""
import os
import sys
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
ADAPTER_NAME = "default"  # the name PEFT gives the job's adapter when it loads it


@dataclass
class LoadedModel:
    """A model ready to generate, with the tokenizer and template its job trained with."""

    cfg: DictConfig  # the job's config (the command's generation/eval settings on top)
    model: torch.nn.Module  # backbone, or PeftModel(backbone, adapter)
    tokenizer: object
    label: str  # ft:… name, or the backbone's name
    job: Optional[JobRef] = None
    stop_token_ids: list[int] = field(default_factory=list)
    _engine: object = field(default=None, repr=False)

    @property
    def chat(self) -> bool:
        return self.cfg.model.format == DataFormat.chat

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def has_adapter(self) -> bool:
        return ADAPTER_NAME in (getattr(self.model, "peft_config", None) or {})

    def engine(self, max_batch_size: int = 16):
        """The decoding engine that generates with this model (made at the first call)."""
        from trainer.engine import Engine

        if self._engine is None:
            self._engine = Engine(self.model, max_batch_size=max_batch_size)
        return self._engine

    def close(self) -> None:
        """Stop the decoding engine, if one was made."""
        if self._engine is not None:
            self._engine.close()


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
def generation_request(loaded: LoadedModel, prompt_ids: list[int], sampling, *, base: bool = False,
                       constraint=None):
    """A request for the decoding engine: the job's adapter (unless `base`), tokenizer and stop tokens."""
    from trainer.engine import Adapter, Request

    adapter = Adapter(ADAPTER_NAME) if loaded.has_adapter and not base else None
    return Request(list(prompt_ids), sampling, loaded.tokenizer, loaded.stop_token_ids, adapter, constraint)


def generate_batch(loaded: LoadedModel, prompts: list[list[int]], *, max_new_tokens: int, temperature: float = 0.0,
                   top_p: float = 1.0, stop: list[str] = (), base: bool = False) -> list[dict]:
    """Replies to tokenized prompts, all submitted to the decoding engine at once (`base`: adapter off).

    Returns one `{"text", "n_tokens"}` per prompt (n_tokens: generated backbone tokens, stop token excluded).
    """
    from trainer.engine import Sampling

    sampling = Sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, stop=tuple(stop))
    requests = [generation_request(loaded, ids, sampling, base=base) for ids in prompts]
    return [{"text": choice.text, "n_tokens": choice.n_tokens}
            for (choice,) in loaded.engine().generate(requests)]


def stream_reply(loaded: LoadedModel, prompt_ids: list[int], gen: DictConfig, out=None, constraint=None) -> str:
    """Generate one reply, writing its text to `out` as it comes; returns the reply (stop strings cut).
    A `constraint` (`trainer.call_constraint.CallConstraint`) limits each next token to those it allows."""
    from trainer.engine import Sampling

    out = out or sys.stdout
    sampling = Sampling(max_new_tokens=int(gen.max_new_tokens), temperature=float(gen.temperature or 0),
                        top_p=float(gen.top_p), seed=gen.get("seed"), stop=tuple(gen.stop or ()))
    generation = loaded.engine().submit(generation_request(loaded, prompt_ids, sampling, constraint=constraint))
    text = ""
    try:
        for delta in generation:
            text += delta.text
            out.write(delta.text)
            out.flush()
    finally:
        generation.cancel()  # Ctrl-C while streaming frees the engine's row
    out.write("\n")
    out.flush()
    return text
