"""Using a fine-tuned model: `ftlab chat` (chat jobs) and `ftlab complete` (prompt/completion jobs).

    ftlab chat job=latest prompt="Hugo Alvarez | Maple Ridge Dental | Porto"   # one reply, then exit
    ftlab chat job=ft:gpt-3.5-turbo:personal::KWjZAb7S                         # interactive, streamed
    ftlab chat job=latest adapter=false      # the same backbone and template, without the adapter
    ftlab chat job=base                      # the configured backbone alone
    ftlab complete job=<babbage-002 job> prompt="My card was charged twice"

Loading, encoding and generating live in `trainer.inference`; this module is the commands.
"""
import sys

import torch
from omegaconf import DictConfig

from trainer.inference import (
    encode_chat_prompt,
    encode_completion_prompt,
    load_model,
    open_job,
    stream_reply,
    training_prompt_suffix,
)
from trainer.jobs import JobNotFound
from trainer.schema import DataFormat

def _seed(gen: DictConfig) -> None:
    if gen.seed is not None:
        torch.manual_seed(int(gen.seed))


# ---- the verbs -------------------------------------------------------------------------------
REPL_HELP = "commands: /reset (new conversation), /system <text>, /exit (or Ctrl-D)"


def _setup(cfg: DictConfig, overrides, want_chat: bool):
    from rich.console import Console

    console = Console(stderr=True, soft_wrap=True)
    try:
        job_cfg, job = open_job(cfg, overrides)
    except JobNotFound as error:
        console.print(f"[red]error[/] {error}", highlight=False)
        return None, console
    is_chat = job_cfg.model.format == DataFormat.chat
    if is_chat != want_chat:
        verb, other = ("chat", "complete") if want_chat else ("complete", "chat")
        console.print(f"[red]error[/] job {job.id if job else 'base'} is a "
                      f"{'chat' if is_chat else 'prompt/completion'} model ({job_cfg.model.name}); "
                      f"use `ftlab {other}` instead of `ftlab {verb}`", highlight=False)
        return None, console
    try:
        loaded = load_model(job_cfg, job, use_adapter=bool(cfg.adapter), console=console)
    except JobNotFound as error:
        console.print(f"[red]error[/] {error}", highlight=False)
        return None, console
    _seed(job_cfg.generation)
    return loaded, console


def chat_main(cfg: DictConfig, overrides: tuple[str, ...] = ()) -> int:
    """`ftlab chat`: one reply to `prompt=`, or an interactive conversation with streamed replies."""
    loaded, console = _setup(cfg, overrides, want_chat=True)
    if loaded is None:
        return 2
    gen = loaded.cfg.generation
    system = loaded.cfg.system
    start = [{"role": "system", "content": system}] if system else []
    if loaded.cfg.prompt is not None:
        messages = start + [{"role": "user", "content": str(loaded.cfg.prompt)}]
        stream_reply(loaded, encode_chat_prompt(loaded.tokenizer, messages), gen)
        return 0
    console.print(f"[bold]{loaded.label}[/]  {REPL_HELP}", highlight=False)
    messages = list(start)
    while True:
        try:
            line = input("you> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return 0
        if line == "/reset":
            messages = list(start)
            continue
        if line.startswith("/system"):
            start = [{"role": "system", "content": line[len("/system"):].strip()}]
            messages = list(start)
            continue
        messages.append({"role": "user", "content": line})
        sys.stdout.write("assistant> ")
        try:
            reply = stream_reply(loaded, encode_chat_prompt(loaded.tokenizer, messages), gen)
        except KeyboardInterrupt:
            print("\n[interrupted]")
            messages.pop()
            continue
        messages.append({"role": "assistant", "content": reply})


def complete_main(cfg: DictConfig, overrides: tuple[str, ...] = ()) -> int:
    """`ftlab complete`: the completion of `prompt=`, or of each line typed (prompt/completion jobs)."""
    loaded, console = _setup(cfg, overrides, want_chat=False)
    if loaded is None:
        return 2
    gen = loaded.cfg.generation
    suffix = gen.prompt_suffix if gen.prompt_suffix is not None else training_prompt_suffix(loaded.job)

    def complete_one(prompt: str) -> str:
        if suffix and not prompt.endswith(suffix):
            prompt += suffix
        return stream_reply(loaded, encode_completion_prompt(loaded.tokenizer, prompt), gen)

    if loaded.cfg.prompt is not None:
        complete_one(str(loaded.cfg.prompt))
        return 0
    console.print(f"[bold]{loaded.label}[/]  one prompt per line"
                  f"{f' (separator {suffix!r} appended)' if suffix else ''}; /exit or Ctrl-D to quit", highlight=False)
    while True:
        try:
            line = input("prompt> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if line.strip() in ("/exit", "/quit"):
            return 0
        if line.strip():
            complete_one(line)
