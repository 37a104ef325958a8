"""`ftlab eval job=...`: the base backbone next to the fine-tuned model, on the validation file.

For each model it measures what training measured (validation loss and mean token accuracy, on
the whole file, the same tokenization and masks) and what a user of the model sees: replies
generated greedily for the first `eval.max_examples` examples, scored by `data.task`:

    json   JSON validity, schema match (the reference's keys, string-or-null values),
           field accuracy, exact match (parsed objects equal)
    terse  words per reply, share of replies within `eval.max_words`, exact match
    tone   share of replies ending with `eval.signoff`, words per reply
    exact  exact match (classification labels)
    tools  where the reference calls functions: tool-name accuracy (the right functions), argument
           JSON validity (every call well-formed, arguments a JSON object), argument field match
           (the reference's argument values), exact calls; where it does not: no-call rate

With `eval.compare_prompts` it also scores the base model given a long instruction prompt
(`eval.instructions[task]`) against the fine-tuned model given none, and prices both per 1,000
requests at the published usage prices (prompt and reply tokens counted with the billing
encoding): the "shorter prompts" claim, measured. Results go to `<run dir>/eval.json` and
`<run dir>/eval.png`. The base model is the same loaded model with its adapter disabled.
"""
import contextlib
import json
import re
import time
from pathlib import Path

from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table

from trainer.inference import (
    encode_chat_prompt,
    encode_completion_prompt,
    generation_request,
    load_model,
    open_job,
)
from trainer.data.jsonl import DataFileError, load_examples
from trainer.data.tokenize import tokenize_examples
from trainer.data.tokens import file_format
from trainer.data.tools import CALL_OPEN, assistant_text, declared_tools, message_calls, parse_tool_calls
from trainer.files import write_json
from trainer.jobs import JobNotFound
from trainer.paths import resolve_data_path
from trainer.schema import DataFormat

BASE, FINE_TUNED = "base", "fine_tuned"
BASE_LONG_PROMPT, FINE_TUNED_NO_PROMPT = "base_long_prompt", "fine_tuned_no_prompt"
LABELS = {BASE: "base", FINE_TUNED: "fine-tuned", BASE_LONG_PROMPT: "base + long prompt",
          FINE_TUNED_NO_PROMPT: "fine-tuned, no prompt"}


# ---- task metrics ----------------------------------------------------------------------------
def _words(text: str) -> int:
    return len(text.split())


def _normal(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip()).rstrip(".").lower()


def _parse_json(text: str):
    try:
        return json.loads(text.strip())
    except (json.JSONDecodeError, ValueError):
        return None


def _same_value(got, want) -> bool:
    if isinstance(want, str) and isinstance(got, str):
        return _normal(got) == _normal(want)
    if isinstance(want, (int, float)) and isinstance(got, (int, float)) and not isinstance(got, bool):
        return float(got) == float(want)
    return got == want


def reply_calls(text: str) -> tuple[list[tuple[str, dict]], bool]:
    """([(name, arguments)] read from a reply, whether every call it attempted was well-formed)."""
    _, calls = parse_tool_calls(text)
    parsed = [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]
    return parsed, bool(parsed) and text.count(CALL_OPEN) <= len(parsed)


def tool_metrics(replies: list[str], references: list[str]) -> dict:
    """The tools task: calls where the reference calls, no call where it does not (None: no such example)."""
    n_call = n_plain = names = valid = exact = no_call = fields_right = fields_total = 0
    for reply, reference in zip(replies, references):
        want, _ = reply_calls(reference)
        got, well_formed = reply_calls(reply)
        if not want:
            n_plain += 1
            no_call += not got and CALL_OPEN not in reply
            continue
        n_call += 1
        names += sorted(n for n, _ in got) == sorted(n for n, _ in want)
        valid += well_formed
        unused = list(got)
        for name, arguments in want:
            match = next((g for g in unused if g[0] == name), None)
            if match is not None:
                unused.remove(match)
            fields_total += len(arguments)
            fields_right += sum(match is not None and key in match[1] and _same_value(match[1][key], value)
                                for key, value in arguments.items())
        exact += len(got) == len(want) and all(
            any(g[0] == name and g[1].keys() == args.keys() and all(_same_value(g[1][k], v) for k, v in args.items())
                for g in got) for name, args in want)

    def rate(hits, total):
        return hits / total if total else None

    return {"tool_name_accuracy": rate(names, n_call), "arguments_valid": rate(valid, n_call),
            "argument_field_accuracy": rate(fields_right, fields_total), "call_exact_match": rate(exact, n_call),
            "no_call_rate": rate(no_call, n_plain), "n_call_expected": n_call, "n_no_call_expected": n_plain}


def task_metrics(task: str | None, replies: list[str], references: list[str], eval_cfg: DictConfig) -> dict:
    """Scores in [0, 1] (rates) plus `mean_words`; which ones depends on `task`."""
    n = max(len(replies), 1)
    metrics = {}
    if task == "tools":
        metrics |= tool_metrics(replies, references)
    elif task == "json":
        valid = schema = exact = fields_right = fields_total = 0
        for reply, reference in zip(replies, references):
            got, want = _parse_json(reply), _parse_json(reference)
            if not isinstance(got, dict):
                fields_total += len(want) if isinstance(want, dict) else 0
                continue
            valid += 1
            if isinstance(want, dict):
                schema += set(got) == set(want) and all(v is None or isinstance(v, str) for v in got.values())
                exact += got == want
                fields_right += sum(key in got and got[key] == value for key, value in want.items())
                fields_total += len(want)
        metrics |= {"json_valid": valid / n, "schema_match": schema / n,
                    "field_accuracy": fields_right / max(fields_total, 1), "exact_match": exact / n}
    else:
        metrics["exact_match"] = sum(_normal(r) == _normal(t) for r, t in zip(replies, references)) / n
    if task == "terse":
        metrics["terse_rate"] = sum(_words(r) <= eval_cfg.max_words for r in replies) / n
    if task == "tone":
        metrics["signoff_rate"] = sum(r.rstrip().endswith(eval_cfg.signoff) for r in replies) / n
    if task == "preference":  # short factual answers preferred: is the fact still there, and how short is the reply
        metrics["fact_kept_rate"] = sum(_normal(t).rstrip(".") in _normal(r) for r, t in zip(replies, references)) / n
        metrics["terse_rate"] = sum(_words(r) <= eval_cfg.max_words for r in replies) / n
    metrics["mean_words"] = sum(_words(r) for r in replies) / n
    return metrics


# ---- what to ask -----------------------------------------------------------------------------
CALL_KEYS = ("function_call", "tool_calls", "tool_call_id")  # kept in prompts: calls and results render as trained


def split_example(example: dict, chat: bool) -> tuple:
    """(prompt, reference): the messages before the last assistant reply and that reply, or prompt/completion.

    A reply that calls functions is given as the fallback renders it (text, then one
    <tool_call>{…}</tool_call> line per call), which `parse_tool_calls` reads back."""
    if not chat:
        return example["prompt"], example["completion"]
    messages = example["messages"]
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    prompt = [{"role": m["role"], "content": m.get("content") or ""}
              | {k: m[k] for k in CALL_KEYS if k in m}
              | ({"name": m["name"]} if m["role"] == "function" and "name" in m else {})
              for m in messages[:last]]
    reply = messages[last]
    return prompt, assistant_text(reply) if message_calls(reply) else reply.get("content") or ""


def with_instructions(prompt, instructions: str, chat: bool):
    """The prompt a base model needs: the long instructions as the system message (or before the prompt)."""
    if not chat:
        return f"{instructions}\n\n{prompt}"
    return [{"role": "system", "content": instructions}] + [m for m in prompt if m["role"] != "system"]


def without_instructions(prompt, chat: bool):
    """The prompt a fine-tuned model needs: no system message."""
    return [m for m in prompt if m["role"] != "system"] if chat else prompt


def billed_prompt_tokens(prompt, chat: bool, encoding, tools: list | None = None) -> int:
    """Input tokens the hosted API bills for this prompt (cookbook counting, reply priming and declared
    functions included)."""
    from trainer.data.tokens import count_example_tokens

    fmt = DataFormat.chat if chat else DataFormat.prompt_completion
    example = ({"messages": prompt} | ({"tools": tools} if tools else {})) if chat else {"prompt": prompt, "completion": ""}
    return count_example_tokens(example, fmt, encoding)


# ---- measuring -------------------------------------------------------------------------------
def loss_and_accuracy(model, dataset, pad_token_id: int, batch_size: int, device) -> dict:
    """Validation loss and mean token accuracy exactly as training reports them."""
    from trainer.loss import validation_loss

    loss_total, supervised, correct = validation_loss(model, dataset, batch_size, pad_token_id, str(device))
    return {"valid_loss": loss_total / max(supervised, 1), "valid_mean_token_accuracy": correct / max(supervised, 1)}


def generate_replies(loaded, runs: dict[str, tuple[list, bool]], tools: list, eval_cfg: DictConfig,
                     console: Console) -> dict[str, list[str]]:
    """Greedy replies of every run (name → (prompts, base?)), all batched together by the decoding engine, so
    the base and fine-tuned models' rows share its forwards; with a progress bar."""
    from rich.progress import Progress

    from trainer.engine import Sampling

    sampling = Sampling(max_new_tokens=int(eval_cfg.max_new_tokens), temperature=0.0)
    requests = [generation_request(loaded, encode(loaded, prompt, prompt_tools), sampling, base=base)
                for prompt_list, base in runs.values() for prompt, prompt_tools in zip(prompt_list, tools)]
    started = time.perf_counter()
    engine = loaded.engine(max_batch_size=int(eval_cfg.max_batch_size))
    before = dict(engine.stats)
    with Progress(console=console, transient=True) as progress:
        bar = progress.add_task("generating replies", total=len(requests))
        results = engine.generate(requests, progress=lambda done: progress.update(bar, completed=done))
    spent = {key: engine.stats[key] - before[key] for key in ("prefill_seconds", "decode_seconds", "steps")}
    console.print(f"[dim]{len(requests)} replies ({', '.join(LABELS[name] for name in runs)}) in "
                  f"{time.perf_counter() - started:.1f} s: prompts {spent['prefill_seconds']:.1f} s, "
                  f"{spent['steps']} decoding steps {spent['decode_seconds']:.1f} s[/]", highlight=False)
    texts, start = {}, 0
    for name, (prompt_list, _) in runs.items():
        texts[name] = [choices[0].text for choices in results[start:start + len(prompt_list)]]
        start += len(prompt_list)
    return texts


def encode(loaded, prompt, prompt_tools) -> list[int]:
    """A prompt's token ids, as training encoded its context."""
    if loaded.chat:
        return encode_chat_prompt(loaded.tokenizer, prompt, prompt_tools)
    return encode_completion_prompt(loaded.tokenizer, prompt)


def run_eval(cfg: DictConfig, loaded, console: Console | None = None) -> dict:
    """Measure base and fine-tuned on `cfg.data.validation_file`; returns the eval.json content."""
    console = console or Console(stderr=True, soft_wrap=True)
    eval_cfg, chat, task = cfg.eval, loaded.chat, cfg.data.task
    path = resolve_data_path(cfg.data.validation_file)
    examples = load_examples(path)
    tokenizer, model = loaded.tokenizer, loaded.model
    pairs_metrics = None
    if file_format(cfg) == DataFormat.preference:  # a DPO job: its pairs, and the preferred replies as answers
        pairs_metrics = preference_metrics(cfg, loaded, examples, console)
        examples = [(line, preferred_example(example)) for line, example in examples]
    disabled = model.disable_adapter if hasattr(model, "disable_adapter") else contextlib.nullcontext

    dataset = tokenize_examples(examples, tokenizer, chat=chat,
                                max_length=cfg.train.max_length or cfg.model.context_length)
    chosen = [example for _, example in examples[: eval_cfg.max_examples]]
    pairs = [split_example(example, chat) for example in chosen]
    prompts, references = [p for p, _ in pairs], [r for _, r in pairs]
    tools = [declared_tools(example) if chat else [] for example in chosen]  # each prompt's functions
    instructions = (eval_cfg.instructions or {}).get(task) if task else None

    def scores_of(base: bool) -> dict:
        started = time.perf_counter()
        with disabled() if base else contextlib.nullcontext():
            scores = loss_and_accuracy(model, dataset, tokenizer.pad_token_id, eval_cfg.batch_size, loaded.device)
        console.print(f"[dim]{LABELS[BASE if base else FINE_TUNED]}: validation loss in "
                      f"{time.perf_counter() - started:.1f} s[/]", highlight=False)
        return scores

    scores = {BASE: scores_of(base=True), FINE_TUNED: scores_of(base=False)}
    runs = {BASE: (prompts, True), FINE_TUNED: (prompts, False)}
    compare = bool(eval_cfg.compare_prompts and instructions)
    if compare:
        runs[BASE_LONG_PROMPT] = ([with_instructions(p, instructions, chat) for p in prompts], True)
        if chat:
            runs[FINE_TUNED_NO_PROMPT] = ([without_instructions(p, chat) for p in prompts], False)
    replies = generate_replies(loaded, runs, tools, eval_cfg, console)

    from trainer.cost import price_row
    from trainer.data.tokens import get_encoding

    encoding = get_encoding(cfg.model.encoding)
    prices = price_row(cfg)

    def measure(name: str, scores: dict) -> dict:
        prompt_list, base = runs[name]
        texts = replies[name]
        prompt_tokens = sum(billed_prompt_tokens(p, chat, encoding, t)
                            for p, t in zip(prompt_list, tools)) / max(len(prompt_list), 1)
        output_tokens = sum(len(encoding.encode_ordinary(t)) for t in texts) / max(len(texts), 1)
        in_price = float(prices.base_input if base and prices.base_input is not None else prices.input)
        out_price = float(prices.base_output if base and prices.base_output is not None else prices.output)
        return scores | task_metrics(task, texts, references, eval_cfg) | {
            "prompt_tokens_per_request": prompt_tokens,
            "output_tokens_per_request": output_tokens,
            "usd_per_1k_requests": prompt_tokens * in_price + output_tokens * out_price,
            "price_per_1k_tokens": {"input": in_price, "output": out_price},
            "replies": texts,
        }

    models = {BASE: measure(BASE, scores[BASE]), FINE_TUNED: measure(FINE_TUNED, scores[FINE_TUNED])}
    for name, values in (pairs_metrics or {}).items():
        models[name] |= values
    report = {
        "object": "ftlab.eval",
        "job": loaded.job.id if loaded.job else None,
        "fine_tuned_model": loaded.label,
        "backbone": cfg.backbone.name,
        "model": cfg.model.name,
        "validation_file": str(path),
        "task": task,
        "n_examples": len(examples),
        "n_generated": len(prompts),
        "decoding": {"greedy": True, "max_new_tokens": eval_cfg.max_new_tokens},
        "created_at": int(time.time()),
        "models": models,
        "references": references,
    }
    if compare:
        base_long = measure(BASE_LONG_PROMPT, scores[BASE])
        tuned_short = measure(FINE_TUNED_NO_PROMPT, scores[FINE_TUNED]) if chat else models[FINE_TUNED]
        saved = base_long["prompt_tokens_per_request"] - tuned_short["prompt_tokens_per_request"]
        report["prompt_comparison"] = {
            "instructions": instructions,
            BASE_LONG_PROMPT: base_long,
            FINE_TUNED_NO_PROMPT: tuned_short,
            "prompt_tokens_saved_per_request": saved,
            "prompt_reduction": saved / max(base_long["prompt_tokens_per_request"], 1e-9),
            "usd_saved_per_1k_requests": base_long["usd_per_1k_requests"] - tuned_short["usd_per_1k_requests"],
        }
    return report


def preferred_example(example: dict) -> dict:
    """A preference line as the chat example whose reply is its preferred output (for the loss and the replies)."""
    source = example["input"]
    return {key: value for key, value in source.items() if key != "messages"} | {
        "messages": source["messages"] + example["preferred_output"]}


def preference_metrics(cfg: DictConfig, loaded, examples: list, console: Console) -> dict:
    """On the validation pairs: how often each model finds the preferred output more likely (mean log-prob a
    token), and the fine-tuned model's DPO reward accuracy and margin with the base as the reference."""
    import torch

    from trainer.data.pairs import pair_batch, tokenize_pairs
    from trainer.hyperparams import resolve_beta
    from trainer.methods.dpo import sequence_log_probs

    started = time.perf_counter()
    dataset = tokenize_pairs(examples, loaded.tokenizer, cfg.train.max_length or cfg.model.context_length)
    model, beta = loaded.model, resolve_beta(cfg.method.dpo.beta)
    lengths = torch.tensor([[len(p.chosen_ids), len(p.rejected_ids)] for p in dataset.pairs], dtype=torch.float32)

    def log_probs() -> torch.Tensor:
        parts = []
        for start in range(0, len(dataset.pairs), cfg.eval.batch_size):
            indices = list(range(start, min(start + cfg.eval.batch_size, len(dataset.pairs))))
            batch = pair_batch(dataset, indices, loaded.tokenizer.pad_token_id, packing=False, row_length=None)
            batch = {key: value.to(loaded.device) for key, value in batch.items()}
            parts.append(sequence_log_probs(model, batch).view(-1, 2).float().cpu())
        return torch.cat(parts)

    with torch.no_grad():
        with model.disable_adapter():
            base = log_probs()
        tuned = log_probs()
    rewards = beta * (tuned - base)
    console.print(f"[dim]{len(dataset.pairs)} validation pairs scored in {time.perf_counter() - started:.1f} s[/]",
                  highlight=False)

    def preferred_more_likely(scores: torch.Tensor) -> float:
        per_token = scores / lengths.clamp(min=1)
        return float((per_token[:, 0] > per_token[:, 1]).float().mean())

    return {BASE: {"preferred_more_likely": preferred_more_likely(base)},
            FINE_TUNED: {"preferred_more_likely": preferred_more_likely(tuned),
                         "reward_accuracy": float((rewards[:, 0] > rewards[:, 1]).float().mean()),
                         "reward_margin": float((rewards[:, 0] - rewards[:, 1]).mean())}}


# ---- showing ---------------------------------------------------------------------------------
QUALITY_KEYS = ["valid_loss", "valid_mean_token_accuracy", "preferred_more_likely", "reward_accuracy", "reward_margin", "json_valid", "schema_match", "field_accuracy",
                "tool_name_accuracy", "arguments_valid", "argument_field_accuracy", "call_exact_match", "no_call_rate",
                "exact_match", "fact_kept_rate", "terse_rate", "signoff_rate", "mean_words"]
COST_KEYS = ["prompt_tokens_per_request", "output_tokens_per_request", "usd_per_1k_requests"]


def _fmt(key: str, value) -> str:
    if value is None:
        return "-"
    if key == "usd_per_1k_requests":
        return f"${value:.4f}"
    if key.endswith(("_rate", "_match", "_valid", "accuracy", "_likely")):
        return f"{value:.1%}"
    return f"{value:.3f}" if key in ("valid_loss", "reward_margin") else f"{value:.1f}"


def print_report(report: dict, console: Console) -> None:
    """The side-by-side table, and the long-prompt comparison when measured."""
    base, tuned = report["models"][BASE], report["models"][FINE_TUNED]
    table = Table(title=f"{report['fine_tuned_model']} vs {report['backbone']} — {report['n_generated']} of "
                        f"{report['n_examples']} validation examples generated (task: {report['task']})")
    table.add_column("metric")
    table.add_column("base", justify="right")
    table.add_column("fine-tuned", justify="right")
    for key in QUALITY_KEYS + COST_KEYS:
        if key in base or key in tuned:  # a DPO job's rewards are the fine-tuned model's, against the base
            table.add_row(key, _fmt(key, base.get(key)), _fmt(key, tuned.get(key)))
    console.print(table)
    comparison = report.get("prompt_comparison")
    if comparison:
        long, short = comparison[BASE_LONG_PROMPT], comparison[FINE_TUNED_NO_PROMPT]
        table = Table(title="Shorter prompts: base + long instructions vs fine-tuned with no system prompt")
        table.add_column("metric")
        table.add_column(LABELS[BASE_LONG_PROMPT], justify="right")
        table.add_column(LABELS[FINE_TUNED_NO_PROMPT], justify="right")
        for key in QUALITY_KEYS[2:] + COST_KEYS:
            if key in long:
                table.add_row(key, _fmt(key, long[key]), _fmt(key, short[key]))
        console.print(table)
        console.print(f"prompt tokens saved per request: {comparison['prompt_tokens_saved_per_request']:.1f} "
                      f"({comparison['prompt_reduction']:.0%}); $ saved per 1,000 requests: "
                      f"${comparison['usd_saved_per_1k_requests']:.4f} (fine-tuned tokens cost more per token)",
                      highlight=False)


def plot_report(report: dict, path: Path) -> Path:
    """eval.png: base vs fine-tuned bars for every rate (and the validation loss on its own axis)."""
    from trainer.plots import plt, save_figure

    base, tuned = report["models"][BASE], report["models"][FINE_TUNED]
    keys = [k for k in QUALITY_KEYS[1:] if base.get(k) is not None and tuned.get(k) is not None and k != "mean_words"]
    figure, (rates, loss) = plt.subplots(1, 2, figsize=(9, 4), dpi=110, gridspec_kw={"width_ratios": [4, 1]})
    x = range(len(keys))
    rates.bar([i - 0.2 for i in x], [base[k] for k in keys], 0.4, label="base", color="#9e9e9e")
    rates.bar([i + 0.2 for i in x], [tuned[k] for k in keys], 0.4, label="fine-tuned", color="#1f77b4")
    rates.set_xticks(list(x), [k.replace("valid_mean_", "") for k in keys], rotation=20, fontsize=8)
    rates.set_ylim(0, 1)
    rates.legend()
    rates.set_title(f"{report['fine_tuned_model']} (task: {report['task']})", fontsize=9)
    loss.bar(["base", "fine-tuned"], [base["valid_loss"], tuned["valid_loss"]], color=["#9e9e9e", "#1f77b4"])
    loss.set_title("validation loss", fontsize=9)
    return save_figure(figure, path)


def evaluate_main(cfg: DictConfig, overrides: tuple[str, ...] = ()) -> int:
    """`ftlab eval`: measure, write eval.json (+ eval.png) into the job's run dir, print the tables."""
    console = Console(soft_wrap=True)
    try:
        job_cfg, job = open_job(cfg, overrides)
        if job is None:
            raise JobNotFound("ftlab eval compares a job with its backbone: pass job=<ftjob-… | ft:… | run dir | latest>")
        if not job_cfg.data.validation_file:
            raise JobNotFound(f"job {job.id} has no validation file: pass data.validation_file=<file.jsonl>")
        loaded = load_model(job_cfg, job, use_adapter=True, console=Console(stderr=True, soft_wrap=True))
        try:
            report = run_eval(job_cfg, loaded, console)
        finally:
            loaded.close()
    except (JobNotFound, DataFileError) as error:
        Console(stderr=True, soft_wrap=True).print(f"[red]error[/] {error}", highlight=False)
        return 2
    write_json(job.run_dir / "eval.json", report)
    print_report(report, console)
    if job_cfg.eval.plot:
        plot_report(report, job.run_dir / "eval.png")
    console.print(f"wrote {job.run_dir / 'eval.json'}" + (" and eval.png" if job_cfg.eval.plot else ""),
                  highlight=False)
    return 0
