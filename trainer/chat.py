"""Using a fine-tuned model: `ftlab chat` (chat jobs) and `ftlab complete` (prompt/completion jobs).

    ftlab chat job=latest prompt="Hugo Alvarez | Maple Ridge Dental | Porto"   # one reply, then exit
    ftlab chat job=ft:gpt-3.5-turbo:personal::KWjZAb7S                         # interactive, streamed
    ftlab chat job=latest adapter=false      # the same backbone and template, without the adapter
    ftlab chat job=base                      # the configured backbone alone
    ftlab complete job=<babbage-002 job> prompt="My card was charged twice"
    ftlab chat job=latest prompt="Weather in Porto?"      # a tools job: → get_weather({"city": "Porto"})

A job trained on function calls chats with the functions of its training file declared (as
training declared them); the calls a reply makes are shown as `→ name({arguments})` instead of
their raw markup, and in the REPL `/tool <result>` answers the oldest unanswered call (the reply
to the results is generated once every call has one).

Loading, encoding and generating live in `trainer.inference`; this module is the commands.
"""
import sys
from pathlib import Path

from omegaconf import DictConfig

from trainer.call_constraint import CallConstraint
from trainer.inference import (
    encode_chat_prompt,
    encode_completion_prompt,
    load_model,
    open_job,
    stream_reply,
    training_prompt_suffix,
)
from trainer.data.tools import CALL_OPEN, declared_tools, format_call, parse_tool_calls
from trainer.jobs import JobNotFound
from trainer.schema import DataFormat


# ---- function calls ------------------------------------------------------------------------
def training_tools(cfg: DictConfig, job, limit: int = 200) -> list[dict]:
    """The functions declared in the job's training file (its first `limit` examples; the first
    declaration of each name wins), as a `tools` list; for job=base, those of `data.train_file`."""
    from trainer.data.jsonl import DataFileError, load_examples
    from trainer.paths import resolve_data_path

    path = (job.record.get("training_file") or {}).get("path") if job is not None else None
    try:
        path = Path(path) if path else resolve_data_path(str(cfg.data.train_file)) if cfg.data.get("train_file") else None
        examples = load_examples(path)[:limit] if path is not None and Path(path).is_file() else []
    except (DataFileError, ValueError):
        return []
    tools: dict[str, dict] = {}
    for _, example in examples:
        for tool in declared_tools(example):
            tools.setdefault(tool["function"].get("name"), tool)
    return list(tools.values())


class CallHidingWriter:
    """Passes a streamed reply through up to its first <tool_call>; the calls are shown parsed afterwards."""

    def __init__(self, out):
        self.out, self.held, self.hid = out, "", False

    def write(self, text: str) -> None:
        if self.hid:
            return
        self.held += text
        at = self.held.find(CALL_OPEN)
        if at >= 0:
            self.out.write(self.held[:at])
            self.held, self.hid = "", True
            return
        keep = next((n for n in range(min(len(CALL_OPEN) - 1, len(self.held)), 0, -1)
                     if CALL_OPEN.startswith(self.held[-n:])), 0)  # what may be the start of a call
        self.out.write(self.held[: len(self.held) - keep])
        self.held = self.held[len(self.held) - keep:]

    def flush(self) -> None:
        self.out.flush()


def show_reply(loaded, messages: list[dict], tools: list[dict], gen: DictConfig) -> dict:
    """Stream one reply (calls shown as `→ name({...})`) and return it as an assistant message."""
    prompt_ids = encode_chat_prompt(loaded.tokenizer, messages, tools)
    if not tools:
        return {"role": "assistant", "content": stream_reply(loaded, prompt_ids, gen)}
    writer = CallHidingWriter(sys.stdout)
    constraint = CallConstraint.for_tools(loaded.tokenizer, tools)  # calls name declared functions, as in the API
    reply = stream_reply(loaded, prompt_ids, gen, out=writer, constraint=constraint)
    content, calls = parse_tool_calls(reply)
    if writer.hid:
        for call in calls:
            print(f"→ {format_call(call)}")
        leftover = (content or "")[(content or "").find(CALL_OPEN):] if CALL_OPEN in (content or "") else ""
        if leftover:
            print(f"(not a well-formed call) {leftover}")
    sys.stdout.flush()
    return {"role": "assistant", "content": content} | ({"tool_calls": calls} if calls else {})


# ---- the verbs -------------------------------------------------------------------------------
REPL_HELP = "commands: /reset (new conversation), /system <text>, /exit (or Ctrl-D)"
TOOLS_HELP = "; /tool <result> answers the oldest unanswered call"


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
    return loaded, console


def chat_main(cfg: DictConfig, overrides: tuple[str, ...] = ()) -> int:
    """`ftlab chat`: one reply to `prompt=`, or an interactive conversation with streamed replies."""
    loaded, console = _setup(cfg, overrides, want_chat=True)
    if loaded is None:
        return 2
    gen = loaded.cfg.generation
    system = loaded.cfg.system
    start = [{"role": "system", "content": system}] if system else []
    tools = training_tools(loaded.cfg, loaded.job)
    if loaded.cfg.prompt is not None:
        messages = start + [{"role": "user", "content": str(loaded.cfg.prompt)}]
        show_reply(loaded, messages, tools, gen)
        return 0
    names = ", ".join(t["function"].get("name") for t in tools)
    console.print(f"[bold]{loaded.label}[/]  {REPL_HELP}{TOOLS_HELP if tools else ''}"
                  + (f"\nfunctions declared (from the training file): {names}" if tools else ""), highlight=False)
    messages = list(start)
    pending: list[str] = []  # ids of the calls still waiting for a /tool result
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
            messages, pending = list(start), []
            continue
        if line.startswith("/system"):
            start = [{"role": "system", "content": line[len("/system"):].strip()}]
            messages, pending = list(start), []
            continue
        if line.startswith("/tool"):
            if not pending:
                console.print("no call is waiting for a result", highlight=False)
                continue
            messages.append({"role": "tool", "tool_call_id": pending.pop(0), "content": line[len("/tool"):].strip()})
            if pending:
                continue  # more results to give before the model answers
        else:
            messages.append({"role": "user", "content": line})
        sys.stdout.write("assistant> ")
        try:
            reply = show_reply(loaded, messages, tools, gen)
        except KeyboardInterrupt:
            print("\n[interrupted]")
            if messages[-1]["role"] == "user":
                messages.pop()
            continue
        messages.append(reply)
        pending = [call["id"] for call in reply.get("tool_calls", [])]


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
