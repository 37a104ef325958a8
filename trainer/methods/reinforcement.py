"""Reinforcement fine-tuning (the hosted API's method.type=reinforcement): group-relative policy optimisation.

Each line of the data is a prompt (`messages` ending with the user's turn) and the fields a grader
reads (`trainer.data.rft`). A step takes `batch_size` prompts and, for each, samples G replies
(G = `group_size` × `compute_multiplier`) from the policy being trained: the decoding engine
(`trainer.engine`) runs the training model itself, with its LoRA adapter as it is now, in the
training thread. Nothing is merged, copied or synced into a second sampler.

The replies are graded (`trainer.graders`, in parallel chunks: a python grader runs in sandboxed
processes), and each reply's advantage is its reward less its group's mean, over the group's
standard deviation. The loss is the clipped policy-gradient loss of PPO/GRPO on the reply tokens,
each reply's tokens averaged, the replies averaged; with `kl_coef` > 0 a KL term (the k3
estimator) keeps the policy near the reference: the policy before training, i.e. the backbone with
the adapter disabled, or, for a job that continues an `ft:` model, the backbone with the parent's
adapter weights (kept aside at the start; no second model). One
optimizer step is taken per sampled batch (as TRL's GRPOTrainer does by default), so the ratio
π/π_old is 1 where the gradient is taken and the clip only matters where G grows past one step.

Validation scores the first `eval_samples` validation prompts with one greedy reply each, every
`eval_interval` steps; the sampled replies and their scores go to the job's events. Sampling seeds
come from (train.seed, epoch, line, sample), so a resumed job replays the same samples.
"""
import json
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from trainer.data.tokenize import IGNORE_INDEX, TokenizedExample, collate, shared_prompt_rows
from trainer.loss import supervised_outputs, token_log_probs
from trainer.methods import Batching, MethodError

REASONING_EFFORTS = {"default": 1.0, "low": 0.5, "medium": 1.0, "high": 2.0}  # × max_new_tokens
MAX_AUTO_EVAL_SAMPLES = 64
GRADING_CHUNK = 16  # samples per grading task (a python grader: one sandboxed process per chunk)
GRADING_THREADS = 4
SHOWN_SAMPLES = 4  # sampled answers recorded in events at each evaluation


@dataclass
class Prompt:
    """One line of a reinforcement file: its prompt's tokens and the item its grader reads."""

    line: int
    prompt_ids: list[int]
    item: dict
    question: str  # the last user message's text, for reports


@dataclass
class PromptDataset:
    """The prompts of a file (what `FineTuningJob` counts as examples)."""

    examples: list[Prompt]
    n_truncated: int = 0
    n_dropped: int = 0  # prompts too long to leave room for a reply
    dropped_lines: list = None
    n_supervised: int = 0  # nothing is supervised: replies are sampled

    @property
    def n_tokens(self) -> int:
        return sum(len(p.prompt_ids) for p in self.examples)


def _choice(value, default, key: str, kind=float, low: float = 0.0):
    """An `auto`-or-number hyperparameter: `default` for auto, else a number above `low`."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return default
    try:
        number = None if isinstance(value, bool) else kind(value)
    except (TypeError, ValueError, OverflowError):
        number = None
    if number is None or not math.isfinite(number) or number <= low or (kind is int and float(value) != number):
        raise MethodError("invalid_hyperparameter", f"method.reinforcement.{key}={value!r} is not valid: use auto or "
                                                    f"a positive {kind.__name__}")
    return number


def resolve_settings(compute_multiplier, eval_interval, eval_samples, reasoning_effort, group_size: int,
                     default_eval_interval: int) -> dict:
    """The hosted hyperparameters as this job uses them (recorded under method.reinforcement.hyperparameters)."""
    multiplier = _choice(compute_multiplier, 1.0, "compute_multiplier")
    if multiplier > 10:
        raise MethodError("invalid_hyperparameter", f"method.reinforcement.compute_multiplier={multiplier:g} is not "
                                                    "valid: the hosted API takes up to 10")
    effort = str(reasoning_effort).strip().lower()
    if effort not in REASONING_EFFORTS:
        raise MethodError("invalid_hyperparameter", f"method.reinforcement.reasoning_effort={reasoning_effort!r} is "
                                                    f"not valid: use one of {', '.join(REASONING_EFFORTS)}")
    return {"compute_multiplier": multiplier,
            "eval_interval": _choice(eval_interval, int(default_eval_interval), "eval_interval", int),
            "eval_samples": _choice(eval_samples, MAX_AUTO_EVAL_SAMPLES, "eval_samples", int),
            "reasoning_effort": effort,
            "samples_per_prompt": max(2, round(int(group_size) * multiplier))}


def read_grader(source: str, settings) -> dict:
    """The grader in a JSON file (`sample://…` too), or given as JSON text (`{...}`: how a job created through the
    API carries its grader), validated; MethodError(invalid_grader) names the problem."""
    from trainer.graders import GraderError, validate
    from trainer.paths import resolve_data_path

    source = str(source)
    inline = source.lstrip().startswith("{")
    name = "method.reinforcement.grader" + ("" if inline else f"={source}")
    try:
        grader = json.loads(source if inline else resolve_data_path(source).read_text(encoding="utf-8"))
    except OSError as error:
        raise MethodError("invalid_grader", f"{name}: cannot read it ({error.strerror})") from None
    except ValueError as error:
        raise MethodError("invalid_grader", f"{name}: not JSON ({error})") from None
    try:
        return validate(grader, settings=settings)
    except GraderError as error:
        raise MethodError("invalid_grader", f"{name}: [{error.param}] {error}") from None


class ReinforcementObjective:
    """The hosted API's method.type=reinforcement (see the module)."""

    results_columns = ("train_reward_mean", "train_reward_std", "train_completion_tokens", "train_kl",
                       "train_grader_seconds", "train_grader_errors", "valid_reward_mean", "valid_reward_std",
                       "valid_completion_tokens", "valid_grader_errors")
    results_file = "reward_results.csv"

    def __init__(self, grader: Optional[str], data_grader: Optional[str], base_learning_rate: float,
                 compute_multiplier="auto", eval_interval="auto", eval_samples="auto", reasoning_effort="default",
                 group_size: int = 8, max_new_tokens: int = 64, temperature: float = 1.0, top_p: float = 1.0,
                 clip_epsilon: float = 0.2, kl_coef: float = 0.0, default_eval_interval: int = 10,
                 graders=None, jobs_root: Optional[str] = None, seed: int = 0, init_adapter: Optional[str] = None,
                 request: Optional[str] = None):
        from trainer.graders import GraderError, Settings, validate
        from trainer.request import read_request

        self.settings = Settings.from_config(graders) if graders is not None else Settings()
        # A job created through the API reads its grader from its request record, as data: a client's grader never
        # passes through the config, where instantiate would resolve any `${...}` in it.
        sent = read_request(request).grader if request else None
        source = grader or data_grader
        if sent is None and not source:
            raise MethodError("invalid_grader", "method=reinforcement needs a grader: method.reinforcement.grader="
                                                "<grader.json> (the hosted API's grader object, as JSON)")
        try:
            self.grader = validate(sent, settings=self.settings) if sent is not None else read_grader(source, self.settings)
        except GraderError as error:
            raise MethodError("invalid_grader", f"the job's grader: [{error.param}] {error}") from None
        self.hyperparameters = resolve_settings(compute_multiplier, eval_interval, eval_samples, reasoning_effort,
                                                group_size, default_eval_interval)
        self.base_learning_rate = float(base_learning_rate)
        self.eval_interval = self.hyperparameters["eval_interval"]
        self.group = self.hyperparameters["samples_per_prompt"]
        self.max_new_tokens = max(1, round(int(max_new_tokens) * REASONING_EFFORTS[self.hyperparameters["reasoning_effort"]]))
        self.temperature, self.top_p = float(temperature), float(top_p)
        self.clip_epsilon, self.kl_coef = float(clip_epsilon), float(kl_coef)
        self.jobs_root, self.seed, self.init_adapter = jobs_root, int(seed), init_adapter
        self.reference_weights: dict = {}  # a continued ft: model's adapter weights as it started (the KL reference)
        self.events = None  # the job's event log (FineTuningJob sets it): sampled answers at each evaluation
        self.engine = self.tokenizer = self.stop_token_ids = self.judge = None
        self.datasets: list[PromptDataset] = []

    # ---- data ----------------------------------------------------------------------------------
    def tokenize(self, path: Path, tokenizer, chat: bool, max_length: int, cache_dir):
        """Every line's prompt, tokenized as chat serving renders it; a line missing a field the grader reads is
        an error at its line. Prompts that leave no room for a reply are dropped (and counted)."""
        from trainer.data.rft import read_prompts

        self.tokenizer = tokenizer
        prompts, dropped = read_prompts(path, tokenizer, self.grader, max_length - self.max_new_tokens)
        dataset = PromptDataset([Prompt(*fields) for fields in prompts], n_dropped=len(dropped), dropped_lines=dropped)
        return dataset, False

    def prepare(self, model, datasets: list, batching: Batching, model_key: str, device: str = "cpu",
                dtype: torch.dtype = torch.float32, batch_size: int = 8) -> None:
        """The decoding engine over the training model itself (its adapter as it trains), and the judge of model
        graders, if the grader has any."""
        from trainer.engine import Engine
        from trainer.inference import end_of_turn_ids

        self.model, self.datasets = model, datasets
        self.stop_token_ids = end_of_turn_ids(self.tokenizer, chat=True)
        rows = max(self.group, min(64, batch_size * self.group))
        self.engine = Engine(model, max_batch_size=rows, max_queue=max(rows, 256))
        self.judge = self._judge()
        if self.init_adapter and self.kl_coef > 0:
            self.reference_weights = {name: parameter.detach().clone() for name, parameter in model.named_parameters()
                                      if parameter.requires_grad}

    def _judge(self):
        from trainer.graders import sub_graders

        kinds = {self.grader["type"]} | {sub["type"] for sub in sub_graders(self.grader).values()}
        if not kinds & {"score_model", "label_model"}:
            return None
        from trainer.compose import compose
        from trainer.jobs import jobs_root
        from trainer.serve.pool import ModelPool

        return ModelPool(compose(), jobs_root(self.jobs_root)).judge  # the families and ft: models, as serve has them

    def batches(self, dataset: PromptDataset, batch_size: int, epoch: int, batching: Batching):
        """The epoch's prompts, shuffled for (seed, epoch), `batch_size` a step; each rank takes its share."""
        order = torch.randperm(len(dataset.examples), generator=torch.Generator().manual_seed(batching.seed + epoch))
        rank, world = batching.shard
        for start in range(0, len(order), batch_size):
            indices = order[start : start + batch_size][rank::world]
            yield {"index": indices, "epoch": torch.full_like(indices, epoch)}

    def count(self, batch: dict) -> int:
        """Sampled replies (the loss is their mean)."""
        return int(batch["index"].numel()) * self.group

    # ---- a step: sample, grade, then the policy gradient over micro-batches --------------------
    def split(self, batch: dict, micro: Optional[int]):
        """Sample and grade the batch's replies, then yield them in pieces of `micro` replies."""
        train = self.datasets[0]
        prompts = [train.examples[i] for i in batch["index"].tolist()]
        epoch = int(batch["epoch"][0]) if batch["epoch"].numel() else 0
        seeds = [self.seed * 1_000_003 + epoch * 100_003 + prompt.line for prompt in prompts]
        replies = self._sample(prompts, seeds, self.group, self.temperature)
        rewards, errors, seconds = self._grade(prompts, replies)
        grouped = torch.tensor(rewards, dtype=torch.float32).view(len(prompts), self.group)
        advantages = (grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-4)
        completions = [[self._completion(reply) for reply in group] for group in replies]
        extra = {"advantage": advantages.reshape(-1), "reward": grouped.reshape(-1),
                 "completion_tokens": torch.tensor([float(reply.n_tokens) for group in replies for reply in group]),
                 "grader_errors": torch.tensor([float(e) for e in errors]),
                 "grader_seconds": torch.full((grouped.numel(),), seconds / max(grouped.numel(), 1))}
        per_part = max(1, (micro or grouped.numel()) // self.group)  # whole groups: a group shares one row
        for first in range(0, len(prompts), per_part):
            pieces = [(prompt.prompt_ids, group) for prompt, group in
                      zip(prompts[first : first + per_part], completions[first : first + per_part])]
            replies_in = slice(first * self.group, (first + len(pieces)) * self.group)
            yield self._layout(pieces) | {key: value[replies_in] for key, value in extra.items()}

    def _layout(self, pieces: list[tuple[list[int], list[list[int]]]]) -> dict:
        """Training rows for (prompt, its replies) pieces: one row a prompt when the attention can take the shared
        layout (`shared_prompt_rows`), else one padded row a reply."""
        from trainer.attention import PACKED_ROWS, SHORT_ROW

        longest = max(len(prompt) + sum(1 + len(c) for c in group) for prompt, group in pieces)
        attention = getattr(getattr(self.model, "config", None), "_attn_implementation", None)
        if attention != PACKED_ROWS or longest <= SHORT_ROW:  # the packed-rows path masks long rows per example
            return shared_prompt_rows(pieces, self.tokenizer.pad_token_id)
        return padded_rows(pieces, self.tokenizer.pad_token_id)

    def _sample(self, prompts: list[Prompt], seeds: list[int], n: int, temperature: float) -> list[list]:
        """`n` replies to each prompt from the policy (its adapter as it is now), in the calling thread."""
        from trainer.engine import Adapter, Request, Sampling

        model = self.model
        was_training = model.training
        model.eval()  # no dropout while sampling
        try:
            requests = [Request(prompt.prompt_ids, Sampling(max_new_tokens=self.max_new_tokens, temperature=temperature,
                                                            top_p=self.top_p, n=n, seed=seed),
                                self.tokenizer, self.stop_token_ids, Adapter(_adapter_name(model)))
                        for prompt, seed in zip(prompts, seeds)]
            return self.engine.generate(requests)
        finally:
            model.train(was_training)

    def _grade(self, prompts: list[Prompt], replies: list[list]) -> tuple[list[float], list[bool], float]:
        """Every reply's reward and whether its grading raised an error flag; the seconds grading took."""
        from trainer.graders import grade_many, sample_namespace

        pairs = [(sample_namespace(reply.text), prompt.item) for prompt, group in zip(prompts, replies)
                 for reply in group]
        started = time.perf_counter()
        chunks = [pairs[i : i + GRADING_CHUNK] for i in range(0, len(pairs), GRADING_CHUNK)]
        with ThreadPoolExecutor(max_workers=min(GRADING_THREADS, max(len(chunks), 1))) as pool:
            graded = [grade for chunk in pool.map(
                lambda chunk: grade_many(self.grader, chunk, self.settings, self.judge), chunks) for grade in chunk]
        return ([grade.reward for grade in graded], [any(v is True for v in grade.errors.values()) for grade in graded],
                time.perf_counter() - started)

    def _completion(self, reply) -> list[int]:
        """A reply's tokens as trained: its end of turn too, when it stopped, so that the model learns where to stop."""
        completion = list(reply.token_ids) + (self.stop_token_ids[-1:] if reply.finish_reason == "stop" else [])
        return completion or self.stop_token_ids[-1:]  # an empty reply that hit no stop: its first token is judged

    def forward(self, model, batch: dict) -> tuple[torch.Tensor, dict]:
        """The summed per-reply clipped policy-gradient loss (+ KL); statistics summed over the replies."""
        reference = self._reference_log_probs(model, batch) if self.kl_coef > 0 else None
        outputs, targets, positions, head = supervised_outputs(model, batch)
        log_probs = token_log_probs(outputs, targets, head)
        row_of = batch["reply_of"].to(targets.device)[:, positions + 1][targets != IGNORE_INDEX]  # each token's reply
        advantage = batch["advantage"].to(log_probs.device)[row_of]
        ratio = torch.exp(log_probs - log_probs.detach())
        clipped = torch.clamp(ratio, 1 - self.clip_epsilon, 1 + self.clip_epsilon)
        per_token = -torch.minimum(ratio * advantage, clipped * advantage)
        kl_sum = 0.0
        if reference is not None:
            delta = reference - log_probs
            kl = torch.exp(delta) - delta - 1
            per_token = per_token + self.kl_coef * kl
        rows = batch["advantage"].numel()  # replies
        tokens = torch.bincount(row_of, minlength=rows).clamp_min(1).to(per_token.dtype)
        per_reply = torch.zeros(rows, dtype=per_token.dtype, device=per_token.device).index_add_(0, row_of, per_token)
        loss_sum = (per_reply / tokens).sum()
        if self.kl_coef > 0:
            kl_sum = float((torch.zeros(rows, device=kl.device).index_add_(0, row_of, kl.detach().float())
                            / tokens.float()).sum())
        reward = batch["reward"].float()
        return loss_sum, {"loss": loss_sum.item(), "reward": float(reward.sum()),
                          "reward_squared": float((reward * reward).sum()),
                          "completion_tokens": float(batch["completion_tokens"].sum()), "kl": kl_sum,
                          "grader_errors": float(batch["grader_errors"].sum()),
                          "grader_seconds": float(batch["grader_seconds"].sum())}

    @torch.no_grad()
    def _reference_log_probs(self, model, batch: dict) -> torch.Tensor:
        """The reply tokens' log-probs under the reference (before the policy's forward: its weights are swapped
        in and back here, which must not happen between a forward and its backward)."""
        owner = getattr(model, "module", model)
        if not self.reference_weights:
            with owner.disable_adapter():
                outputs, targets, _, head = supervised_outputs(model, batch)
                return token_log_probs(outputs, targets, head)
        parameters = dict(owner.named_parameters())
        current = {name: parameters[name].data for name in self.reference_weights}
        try:
            for name, weight in self.reference_weights.items():
                parameters[name].data = weight
            outputs, targets, _, head = supervised_outputs(model, batch)
            return token_log_probs(outputs, targets, head)
        finally:
            for name, weight in current.items():
                parameters[name].data = weight

    # ---- metrics and validation ----------------------------------------------------------------
    def metrics(self, totals: dict, split: str) -> dict:
        """train_loss and train_accuracy (results.csv's hosted columns: the policy loss and the mean reward) and
        the reward statistics; valid_reward_mean and the rest for the validation prompts."""
        n = max(totals["count"], 1)
        mean = totals["reward"] / n
        std = math.sqrt(max(totals["reward_squared"] / n - mean * mean, 0.0))
        row = {f"{split}_reward_mean": round(mean, 6), f"{split}_reward_std": round(std, 6),
               f"{split}_completion_tokens": round(totals["completion_tokens"] / n, 2),
               f"{split}_grader_errors": int(totals["grader_errors"])}
        if split == "train":
            row = {"train_loss": round(totals["loss"] / n, 6), "train_accuracy": round(mean, 6)} | row
            row["train_grader_seconds"] = round(totals["grader_seconds"], 3)
            if self.kl_coef > 0:
                row["train_kl"] = round(totals["kl"] / n, 6)
        return row

    @torch.no_grad()
    def evaluate(self, model, dataset: PromptDataset, batch_size: int, batching: Batching, device: str,
                 dtype: torch.dtype) -> dict:
        """One greedy reply to each of the first `eval_samples` validation prompts (this rank's share), graded."""
        rank, world = batching.shard
        prompts = dataset.examples[: self.hyperparameters["eval_samples"]][rank::world]
        totals = {"count": len(prompts), "reward": 0.0, "reward_squared": 0.0, "completion_tokens": 0.0,
                  "grader_errors": 0.0}
        if not prompts:
            return totals
        replies = self._sample(prompts, [0] * len(prompts), 1, 0.0)
        rewards, errors, _ = self._grade(prompts, replies)
        totals |= {"reward": sum(rewards), "reward_squared": sum(r * r for r in rewards),
                   "completion_tokens": float(sum(group[0].n_tokens for group in replies)),
                   "grader_errors": float(sum(errors))}
        if self.events is not None and rank == 0:
            shown = [{"line": prompt.line, "prompt": prompt.question[-300:], "reply": group[0].text[-500:],
                      "reward": round(reward, 4)}
                     for prompt, group, reward in list(zip(prompts, replies, rewards))[:SHOWN_SAMPLES]]
            self.events.add(f"Sampled answers at evaluation: mean reward {sum(rewards) / len(rewards):.4f} over "
                            f"{len(rewards)} validation prompts", data={"samples": shown})
        return totals


def padded_rows(pieces: list[tuple[list[int], list[list[int]]]], pad_token_id: int) -> dict:
    """One right-padded row for each reply, after its prompt; `reply_of` names the reply of each label."""
    examples = [TokenizedExample(prompt + completion, [IGNORE_INDEX] * len(prompt) + completion)
                for prompt, group in pieces for completion in group]
    rows = collate(examples, pad_token_id)
    return rows | {"reply_of": torch.where(rows["labels"] != IGNORE_INDEX, torch.arange(len(examples))[:, None], -1)}


def _adapter_name(model) -> str:
    """The PEFT name of the adapter being trained (the engine serves it under that name)."""
    model = getattr(model, "module", model)
    return getattr(model, "active_adapter", None) or next(iter(model.peft_config))
