"""The training stage, top to bottom: pre-flight → data → model → optimizer → loop → adapter.

`FineTuningJob` follows the shape of torchtune's single-device LoRA recipe: `setup` builds
every part from config, `train` runs the loop, `cleanup` closes the record. `run_training`
at the bottom is what `ftlab train` calls.
"""
import math
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)

from trainer import checkpoints
from trainer.data.jsonl import DataFileError, check_file
from trainer.data.tokenize import TemplateError, batch_tokens
from trainer.distributed import (
    ProcessGroup,
    clip_gradients,
    destroy,
    full_parameters,
    init_process_group,
    sum_across,
    wrap,
)
from trainer.files import write_json
from trainer.flops import flops_per_token, peak_flops
from trainer.fused import fuse_rms_norms
from trainer.hyperparams import SettingsError, check_job_settings, resolve_hyperparameters
from trainer.methods import Batching, MethodError, autocast
from trainer.model import (
    add_lora,
    apply_liger_kernels,
    compile_decoder_layers,
    keep_cpu_memory_flat,
    backbone_folder,
    liger_patches,
    load_base_model,
    load_tokenizer,
    resolve_runtime,
)
from trainer.paths import cache_dir
from trainer.preemption import REQUEUED_EXIT, JobCancelled, StopSignals, resumes_after_requeue, slurm_runs_it_again
from trainer.preflight import data_files
from trainer.request import logger_options
from trainer.plots import plot_losses
from trainer.files import sha256_of
from trainer.run import (
    HANDED_LOCK_ENV,
    EventLog,
    Job,
    ResultsTable,
    RunLock,
    describe_environment,
    fine_tuned_model_name,
)
from trainer.schema import DataFormat


SHORT_NAMES = {"valid_mean_token_accuracy": "valid_acc"}  # in the progress line


class JobFailed(Exception):
    """A failure with an error code and a message written for the user."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def warmup_schedule(optimizer, total_steps: int, name: str = "linear", warmup_ratio: float = 0.05):
    """transformers' named schedule (`linear`, `cosine`, …) warming up over the first `warmup_ratio` of the steps."""
    from transformers import get_scheduler

    return get_scheduler(name, optimizer, num_warmup_steps=int(warmup_ratio * total_steps),
                         num_training_steps=total_steps)


class FineTuningJob:
    """One fine-tuning job in one run directory."""

    def __init__(self, cfg: DictConfig, run_dir: Path, console: Console | None = None, resume: bool = False,
                 group: ProcessGroup = ProcessGroup(), checkpoints_dir: Path | None = None,
                 stops: StopSignals | None = None):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.console = console or Console()
        self.resume = resume  # continue the job recorded in run_dir
        self.group = group  # this process's place among the launched ones (rank 0 keeps the record)
        self.checkpoints_dir = Path(checkpoints_dir or self.run_dir / "checkpoints")
        self.stops = stops or StopSignals()  # the signals that stop the job (run_training installs them)
        self.events = EventLog(self.run_dir / "events.jsonl")
        self.results = ResultsTable(self.run_dir / "results.csv")
        self.step = 0
        self.tokens_seen = 0
        self.position = (0, 0)  # (epoch, batch index) of the next batch to train on
        self.nonfinite_in_a_row = 0
        self.nonfinite_total = 0
        self.method_results: ResultsTable | None = None  # the method's own metrics (DPO's), beside results.csv
        self.job: Job | None = None  # each part exists once setup has built it (cleanup checks which)
        self.train_model = None
        self.logger = None

    # ---- setup -------------------------------------------------------------------------
    def setup(self) -> None:
        """Record the job, run the pre-flight, then build data, model, optimizer and logger."""
        cfg = self.cfg
        keep_cpu_memory_flat()
        files = data_files(cfg)  # resolved once; the pre-flight, the record and tokenizing use these paths
        for path in files.values():
            try:
                check_file(path)
            except DataFileError as error:
                raise JobFailed(error.code, str(error)) from None
        if self.resume:
            self.job = Job.load(self.run_dir)
            self.events.add(f"Resuming fine-tuning job: {self.job.id}")
        elif (self.run_dir / "job.json").exists():
            # a job `ftlab serve` created and queued: this process is the one that trains it
            self.job = Job.load(self.run_dir)
            if self.job.record.get("status") != "queued":
                self.job = None  # not ours to record on
                raise JobFailed("run_dir_not_empty", f"{self.run_dir} already holds a job; resume it with "
                                f"resume={self.run_dir} or choose another hydra.run.dir")
        else:
            self.job = Job.create(self.run_dir, model=cfg.model.name, org=cfg.org, suffix=cfg.suffix,
                                  training_file=files["train"], validation_file=files.get("validation"),
                                  backbone=cfg.backbone.name, seed=cfg.train.seed)
            self.events.add(f"Created fine-tuning job: {self.job.id}")
            try:  # refused before anything is read or loaded, and recorded like any failure
                check_job_settings(cfg)
            except SettingsError as error:
                raise JobFailed(error.code, str(error)) from None
        self.estimate, train_path, valid_path = self._preflight(files)
        self.train_path, self.valid_path = train_path, valid_path
        write_json(self.run_dir / "env.json", describe_environment(
            cfg.train.seed, {"training_file": train_path} | ({"validation_file": valid_path} if valid_path else {})))
        torch.manual_seed(cfg.train.seed)
        random.seed(cfg.train.seed)
        self.runtime = resolve_runtime(cfg.train)
        if cfg.train.liger_kernel:
            liger_patches(self.runtime)  # fail before tokenizing and loading the model, not after
        try:
            self.objective = instantiate(cfg.method.objective)  # the method: its batches, loss and metrics
        except InstantiationException as error:
            cause = error.__cause__ if isinstance(error.__cause__, MethodError) else None
            if cause is None:
                raise
            raise JobFailed(cause.code, str(cause)) from None
        self.objective.events = self.events  # a method may record events of its own (RFT: sampled answers)
        self.eval_every = getattr(self.objective, "eval_interval", None) or cfg.train.eval_every
        if self.objective.results_file:
            self.method_results = ResultsTable(self.run_dir / self.objective.results_file,
                                               ["step", *self.objective.results_columns])
        self._setup_data()
        self._setup_model()
        self.objective.prepare(self.model, [d for d in (self.train_data, self.valid_data) if d], self.batching,
                               self._model_key(), self.runtime.device, self.runtime.dtype,
                               self.hyperparameters["batch_size"])
        self._setup_optimizer()
        peak = peak_flops(self.runtime.device, self.runtime.dtype, cache_dir(cfg.cache_dir))
        self.peak_flops = peak * self.group.world_size if peak else None  # MFU's denominator: every rank's device
        self.flops_per_token = flops_per_token(cfg.backbone.n_params)
        if self.resume or self.checkpoints_dir.parent != self.run_dir:
            self._restore_checkpoint()
        self.train_model = wrap(self.model, self.group, self.runtime.device, cfg.train.distributed.value)
        if self.group.enabled:
            self.events.add(f"Training on {self.group.world_size} process(es) with {cfg.train.distributed.value}: "
                            f"{type(self.train_model).__name__}", data={"world_size": self.group.world_size})
        # Built as a partial and called with plain arguments: instantiate would merge keyword arguments into
        # a config and resolve them, and the run config and the request's wandb names are data, not config.
        logger = instantiate(cfg.logger if self.group.is_main else {"_target_": "trainer.loggers.NullLogger"},
                             _partial_=True, _recursive_=False, _convert_="all")
        self.logger = logger(run_dir=self.run_dir, name=self.job.id,
                             run_config=OmegaConf.to_container(cfg, resolve=True, enum_to_str=True),
                             **(logger_options(cfg) if self.group.is_main else {}))

    def _preflight(self, files: dict) -> tuple[dict, Path, Path | None]:
        """Validate, screen and price the files; the files to train on (moderation may have dropped lines)."""
        from trainer.preflight import PreflightError, run_preflight

        self.events.add("Validating training file")
        try:
            preflight = run_preflight(self.cfg, self.run_dir, self.console, files)
        except PreflightError as error:
            raise JobFailed(error.code, error.message) from None
        shown = {key: value for key, value in preflight.estimate.items() if key != "training_file"}  # no server path
        self.events.add("Files validated, estimate ready", data=shown)
        return preflight.estimate, preflight.train_file, preflight.validation_file

    def _setup_data(self) -> None:
        cfg = self.cfg
        self.tokenizer = load_tokenizer(cfg)
        max_length = self.max_length = cfg.train.max_length or cfg.model.context_length
        self.batching = Batching(cfg.train.seed, self.tokenizer.pad_token_id, cfg.train.packing, max_length,
                                 (self.group.rank, self.group.world_size))
        chat = cfg.model.format == DataFormat.chat
        self.train_data = self._tokenize(self.train_path, chat, max_length)
        self.valid_data = self._tokenize(self.valid_path, chat, max_length) if self.valid_path else None
        try:
            self.hyperparameters = resolve_hyperparameters(
                cfg.train, len(self.train_data.examples), n_epochs=self.estimate["n_epochs"],
                base_learning_rate=self.objective.base_learning_rate,
                method_hyperparameters=self.objective.hyperparameters)
        except ValueError as error:
            raise JobFailed("invalid_hyperparameter", str(error)) from None
        hp = self.hyperparameters
        self.steps_per_epoch = math.ceil(len(self.train_data.examples) / hp["batch_size"])
        self.total_steps = self.steps_per_epoch * hp["n_epochs"]
        if cfg.train.max_steps is not None:
            self.total_steps = min(self.total_steps, cfg.train.max_steps)
        self.job.update(hyperparameters=hp)
        self.events.add(
            f"Tokenized {len(self.train_data.examples)} training examples ({self.train_data.n_tokens} tokens, "
            f"{self.train_data.n_supervised} supervised); {self.train_data.n_truncated} truncated to {max_length}, "
            f"{self.train_data.n_dropped} dropped with nothing left to train on",
            level="warn" if self.train_data.n_truncated or self.train_data.n_dropped else "info",
            data={"n_truncated": self.train_data.n_truncated, "n_dropped": self.train_data.n_dropped,
                  "dropped_lines": self.train_data.dropped_lines},
        )

    def _tokenize(self, path: Path, chat: bool, max_length: int):
        cache = cache_dir(self.cfg.cache_dir) if self.cfg.data.cache_tokenized else None
        try:
            dataset, cached = self.objective.tokenize(path, self.tokenizer, chat, max_length, cache)
        except DataFileError as error:
            raise JobFailed(error.code, str(error)) from None
        except TemplateError as error:
            raise JobFailed("invalid_chat_template", str(error)) from None
        if cached:
            self.events.add(f"Tokenized {path.name}: read from the tokenization cache", data={"cached": True})
        return dataset

    def _setup_model(self) -> None:
        torch.manual_seed(self.cfg.train.seed)
        base = load_base_model(self.cfg, self.runtime)
        if self.cfg.train.liger_kernel:
            apply_liger_kernels(base, self.runtime)
        elif self.cfg.train.fused_rms_norm:
            fuse_rms_norms(base)
        if (self.cfg.train.packing and self.runtime.device == "cpu" and not self.cfg.train.compile
                and base.config._attn_implementation == "sdpa"):
            from trainer.attention import PACKED_ROWS

            base.set_attn_implementation(PACKED_ROWS)  # CPU SDPA is slow on packed rows (see trainer/attention.py)
        self.model = add_lora(base, self.cfg, self.runtime)
        if self.cfg.train.compile:
            compile_decoder_layers(self.model)
        trainable, total = self.model.get_nb_trainable_parameters()
        self.events.add(f"Loaded {self.cfg.backbone.name} on {self.runtime.device} "
                        f"({self.runtime.precision_name}, quantization {self.runtime.quantization}); "
                        f"LoRA trains {trainable:,} of {total:,} parameters",
                        data={"trainable_parameters": trainable, "total_parameters": total})

    def _model_key(self) -> str:
        """What the model is before the first step (backbone files, starting adapter, precision and numerics):
        computed things kept across processes, such as DPO's reference log-probs, are valid for this key."""
        folder = Path(backbone_folder(self.cfg))
        files = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir() if p.is_file())
        adapter = Path(self.cfg.init_adapter) / "adapter_model.safetensors" if self.cfg.get("init_adapter") else None
        parts = [OmegaConf.to_yaml(self.cfg.backbone), repr(files), sha256_of(adapter) if adapter else "",
                 OmegaConf.to_yaml(self.cfg.lora), repr(self.runtime), str(self.model.config._attn_implementation),
                 str(self.cfg.train.fused_rms_norm), str(self.cfg.train.liger_kernel), torch.__version__]
        import hashlib

        return hashlib.sha256("\0".join(parts).encode()).hexdigest()

    def _setup_optimizer(self) -> None:
        params = self.trainable_parameters = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = instantiate(self.cfg.optim)(params, lr=self.hyperparameters["learning_rate"])
        self.scheduler = instantiate(self.cfg.scheduler)(self.optimizer, total_steps=self.total_steps)

    # ---- the loop ----------------------------------------------------------------------
    def train(self) -> None:
        """Run optimizer steps until the epochs (or `train.max_steps`) are done, from `self.position`."""
        cfg, hp = self.cfg, self.hyperparameters
        self.job.update(status="running", finished_at=None, error=None)
        self.events.add(f"Fine-tuning job started: {self.total_steps} steps, {hp['n_epochs']} epochs, "
                        f"batch size {hp['batch_size']}, learning rate {hp['learning_rate']:.2e}"
                        + (f", resumed at step {self.step}" if self.step else ""))
        self.train_model.train()
        started, tokens_at_start = time.perf_counter(), self.tokens_seen
        columns = [TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("loss {task.fields[loss]}  {task.fields[tps]} tok/s  mfu {task.fields[mfu]}"),
                   TimeRemainingColumn()]
        with self.stops.at_step_end(), Progress(*columns, console=self.console, transient=False) as progress:
            task = progress.add_task("train", total=self.total_steps, completed=self.step, loss="-", tps="-", mfu="-")
            first_epoch, first_batch = self.position
            for epoch in range(first_epoch, hp["n_epochs"]):
                batches = self.objective.batches(self.train_data, hp["batch_size"], epoch, self.batching)
                for batch_index, batch in enumerate(batches):
                    if epoch == first_epoch and batch_index < first_batch:
                        continue  # trained before the checkpoint this run resumed from
                    self.stops.check(self._any_rank)  # a stop signal ends the job here, between two steps
                    if self.step >= self.total_steps:
                        break
                    metrics = self._optimizer_step(batch)
                    self.position = (epoch, batch_index + 1)
                    if metrics is None:
                        continue  # non-finite loss or gradient: step skipped, counted in events
                    loss = metrics["train_loss"]
                    self.step += 1
                    elapsed = time.perf_counter() - started
                    tokens_per_second = (self.tokens_seen - tokens_at_start) / max(elapsed, 1e-9)
                    speed = {"tokens_per_second": round(tokens_per_second, 1)}
                    if self.peak_flops:
                        speed["mfu"] = round(tokens_per_second * self.flops_per_token / self.peak_flops, 4)
                    row = {"step": self.step} | metrics
                    validated = bool(self.valid_data) and (self.step % self.eval_every == 0
                                                           or self.step == self.total_steps)
                    if validated:
                        row |= self.evaluate()
                    self.results.add(row)
                    if self.method_results is not None:
                        self.method_results.add(row)
                    self.logger.log({k: v for k, v in row.items() if k != "step"} | speed, step=self.step)
                    self.events.add(f"Step {self.step}/{self.total_steps}: training loss={loss:.4f}", type="metrics",
                                    data=row | speed | {"total_steps": self.total_steps})
                    progress.update(task, advance=1, loss=f"{loss:.4f}", tps=f"{tokens_per_second:,.0f}",
                                    mfu=f"{speed['mfu']:.1%}" if "mfu" in speed else "-")
                    if validated or not self.console.is_terminal and self.step % self.eval_every == 0:
                        progress.console.print(self._progress_line(row, speed, elapsed))
                    if cfg.train.checkpoint_every and self.step % cfg.train.checkpoint_every == 0:
                        self.save_checkpoint()
                if self.step:  # the epoch ended, or the job's last step (train.max_steps) ends it here
                    self.save_checkpoint(epoch=epoch + 1)
                if self.step >= self.total_steps:
                    break
            self.stops.check(self._any_rank)
        self.wall_seconds = time.perf_counter() - started

    def _any_rank(self, flag: bool) -> bool:
        """Whether `flag` is set on any rank (on one process: `flag`)."""
        return sum_across(self.group, [float(flag)], self.runtime.device)[0] > 0

    def _progress_line(self, row: dict, speed: dict, elapsed: float) -> str:
        remaining = elapsed / max(self.step, 1) * (self.total_steps - self.step)
        valid = "".join(f"  {SHORT_NAMES.get(key, key)} {value:.{4 if 'loss' in key else 3}f}"
                        for key, value in row.items() if key.startswith("valid_") and isinstance(value, float))
        return (f"step {self.step}/{self.total_steps}  loss {row['train_loss']:.4f}  acc {row['train_accuracy']:.3f}"
                f"{valid}  {speed['tokens_per_second']:,.0f} tok/s"
                + (f"  mfu {speed['mfu']:.1%}" if "mfu" in speed else "") + f"  eta {remaining:.0f}s")

    def _optimizer_step(self, batch: dict) -> dict | None:
        """Forward and backward over the batch (in micro-batches) and one optimizer step.

        Returns the step's metrics (the method's: train_loss, train_accuracy, …), or None when the loss or a
        gradient was not finite: the step is skipped and counted; `train.max_nonfinite_steps` in a row fail the job.
        """
        # Normalise by the global count; DDP averages gradients over ranks, so scale back up by world size.
        count = int(sum_across(self.group, [self.objective.count(batch)], self.runtime.device)[0])
        loss_scale = self.group.world_size / max(count, 1)
        totals, tokens = {}, 0
        for part in self.objective.split(batch, self.cfg.train.micro_batch_size):
            part = {key: value.to(self.runtime.device) for key, value in part.items()}
            with autocast(self.runtime.device, self.runtime.dtype):
                loss_sum, statistics = self.objective.forward(self.train_model, part)
            (loss_sum * loss_scale).backward()
            for key, value in statistics.items():
                totals[key] = totals.get(key, 0) + value
            tokens += batch_tokens(part)
        summed = sum_across(self.group, [*totals.values(), tokens], self.runtime.device)
        totals, tokens = dict(zip(totals, summed[:-1])), summed[-1]
        grad_norm = clip_gradients(self.train_model, self.trainable_parameters, self.cfg.train.max_grad_norm)
        if not (math.isfinite(totals["loss"]) and torch.isfinite(grad_norm)):
            self.optimizer.zero_grad(set_to_none=True)
            self._count_nonfinite(totals["loss"], float(grad_norm))
            return None
        self.nonfinite_in_a_row = 0
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.tokens_seen += int(tokens)
        return self.objective.metrics(totals | {"count": count}, "train")

    def _count_nonfinite(self, loss: float, grad_norm: float) -> None:
        self.nonfinite_in_a_row += 1
        self.nonfinite_total += 1
        limit = self.cfg.train.max_nonfinite_steps
        self.events.add(f"Skipped a step with a non-finite loss or gradient (loss={loss}, grad_norm={grad_norm}); "
                        f"{self.nonfinite_in_a_row} in a row, {self.nonfinite_total} in all", level="warn",
                        data={"nonfinite_in_a_row": self.nonfinite_in_a_row, "nonfinite_total": self.nonfinite_total,
                              "after_step": self.step})
        if self.nonfinite_in_a_row >= limit:
            raise JobFailed("nonfinite_loss", f"{limit} steps in a row had a non-finite loss or gradient after step "
                            f"{self.step}; the last good checkpoint is kept in checkpoints/. Lower "
                            "train.learning_rate_multiplier, keep train.max_grad_norm, or use train.precision=fp32/bf16 "
                            "instead of fp16")

    def evaluate(self) -> dict:
        """The method's validation metrics over the whole validation file (SFT: loss and mean token accuracy)."""
        self.train_model.eval()
        totals = self.objective.evaluate(self.train_model, self.valid_data, self.hyperparameters["batch_size"],
                                         self.batching, self.runtime.device, self.runtime.dtype)
        totals = dict(zip(totals, sum_across(self.group, list(totals.values()), self.runtime.device)))
        self.train_model.train()
        return self.objective.metrics(totals, "valid")

    # ---- checkpoints -------------------------------------------------------------------
    def save_checkpoint(self, epoch: int | None = None) -> Path:
        """Write `checkpoints/step-N/` (adapter, optimizer, scheduler, RNG states, data position): with `epoch`, the
        checkpoint the epoch ends with (the last three epochs' are kept), else a resume checkpoint (the newest
        `train.keep_checkpoints` are kept)."""
        target = checkpoints.checkpoint_path(self.checkpoints_dir, self.step)
        keep = self.cfg.train.keep_checkpoints
        with full_parameters(self.train_model):
            if not self.group.is_main:
                return target
            if target.exists():  # this step's resume checkpoint is also the epoch's
                if epoch is not None and not checkpoints.is_epoch_checkpoint(target):
                    checkpoints.mark_epoch(target, epoch, keep)
                    self._checkpoint_event(target, epoch)
                return target
            staging = checkpoints.stage_adapter(self.checkpoints_dir, self.model)
        loop_state = {"step": self.step, "position": self.position, "tokens_seen": self.tokens_seen,
                      "nonfinite_total": self.nonfinite_total}
        checkpoints.commit(staging, target, loop_state, self.optimizer, self.scheduler, keep, epoch=epoch)
        self._checkpoint_event(target, epoch)
        return target

    def _checkpoint_event(self, target: Path, epoch: int | None) -> None:
        name = f"{self.checkpoints_dir.name}/{target.name}"  # run-dir-relative: no place on the server's disk
        self.events.add(f"Checkpoint saved at step {self.step}" + (f" (end of epoch {epoch})" if epoch else ""),
                        data={"path": name, "step": self.step} | ({"epoch": epoch} if epoch else {}))

    def _restore_checkpoint(self) -> None:
        """Load the newest checkpoint that reads back whole; skip broken ones with a warning."""
        from peft.utils import set_peft_model_state_dict

        for folder in checkpoints.newest_first(self.checkpoints_dir):
            try:
                adapter, state = checkpoints.read(folder)
                set_peft_model_state_dict(self.model, adapter)
                if self.group.enabled and self.cfg.train.distributed.value == "fsdp":
                    # rank 0's optimizer state covers only its shard; the moments restart
                    self.events.add("FSDP resume: optimizer moments restart from zero", level="warn")
                else:
                    self.optimizer.load_state_dict(state["optimizer"])
                self.scheduler.load_state_dict(state["scheduler"])
            except Exception as error:  # noqa: BLE001 - any unreadable checkpoint is skipped the same way
                self.events.add(f"Skipped unreadable checkpoint {folder.name}: {type(error).__name__}: {error}",
                                level="warn")
                self.console.print(f"[yellow]warning[/] skipped unreadable checkpoint {folder.name} ({error})")
                continue
            checkpoints.restore_rng(state)
            self.step, self.position = state["step"], tuple(state["position"])
            self.tokens_seen, self.nonfinite_total = state["tokens_seen"], state["nonfinite_total"]
            self.results.load(until_step=self.step)
            if self.method_results is not None:
                self.method_results.load(until_step=self.step)
            self.events.drop_metrics_after(self.step)
            self.events.add(f"Resumed from checkpoint {folder.name}", data={"step": self.step})
            return
        self.events.drop_metrics_after(0)  # the steps of a run that died before its first checkpoint
        self.events.add("No usable checkpoint: starting from step 0", level="warn")

    # ---- finishing ---------------------------------------------------------------------
    def cleanup(self, status: str, error: dict | None = None, reason: str = "") -> None:
        """Close the job however it ended, at any point of setup or training.

        `cancelled` checkpoints first (so it can resume) and `failed` records `error` {code, message};
        `succeeded` was recorded by `finish`. `requeued` (Slurm runs the job again) checkpoints and leaves the job
        `queued`: the next run resumes it. Then the logger is closed with the status.
        """
        if self.job is not None and status == "requeued":
            if self.train_model is not None and self.step:
                self.save_checkpoint()
            self.job.update(status="queued", finished_at=None)
            self.events.add(f"Job stopped ({reason}) at step {self.step} and requeued by Slurm (job "
                            f"{os.environ.get('SLURM_JOB_ID')}): it resumes from its newest checkpoint when Slurm "
                            "runs it again", level="warn", data={"step": self.step, "requeued": True})
        elif self.job is not None and status != "succeeded":
            if status == "cancelled" and self.train_model is not None and self.step:
                self.save_checkpoint()
            self.job.finish(status, error=error)
            if status == "cancelled":
                self.events.add(f"Job cancelled ({reason or 'interrupted'}) at step {self.step}", level="warn")
            else:
                self.events.add(f"Job failed: [{error['code']}] {error['message']}", level="error")
        if self.logger is not None:
            self.logger.finish(status)

    def save_adapter(self) -> Path:
        """Write the final adapter (PEFT format) and tokenizer to `adapter/`, atomically."""
        target = self.run_dir / "adapter"
        staging = Path(tempfile.mkdtemp(dir=self.run_dir, prefix=".adapter-"))
        with full_parameters(self.train_model):
            self.model.save_pretrained(staging)
        self.tokenizer.save_pretrained(staging)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
        return target

    def finish(self) -> None:
        """Save the adapter and plot, mark the job succeeded."""
        self.save_adapter()
        plot_losses(self.results.rows, self.run_dir / "loss.png", title=f"{self.job.id} · {self.cfg.backbone.name}")
        name = fine_tuned_model_name(self.cfg.model.name, self.cfg.org, self.cfg.suffix, self.job.id)
        tokens = {"trained_tokens": self.billed_tokens(), "backbone_tokens": self.tokens_seen}
        self.job.finish("succeeded", fine_tuned_model=name, result_files=["results.csv", "adapter", "loss.png"],
                        **tokens)
        self.events.add(f"New fine-tuned model created: {name}")
        self.events.add(f"The job has successfully completed: {name}",
                        data={"wall_seconds": round(self.wall_seconds, 2), **tokens,
                              "nonfinite_steps_skipped": self.nonfinite_total})

    def billed_tokens(self) -> int:
        """The hosted service's `trained_tokens`: estimate.json's billed tokens (cl100k, capped per example, times
        the epochs), for the share of the scheduled steps this job trained (all of them unless `train.max_steps`
        stopped it early, or non-finite steps were skipped)."""
        scheduled = self.steps_per_epoch * self.hyperparameters["n_epochs"]
        return round(self.estimate["billed_tokens"] * min(1.0, self.step / max(scheduled, 1)))


OUT_OF_MEMORY_HELP = (
    "out of memory. Knobs that help, roughly in order: train.micro_batch_size=1 (or a smaller train.batch_size), "
    "train.gradient_checkpointing=true, train.max_length=1024 (shorter examples), train.quantization=nf4 "
    "(4-bit backbone), lora.r=8, a smaller backbone"
)


def _is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def run_training(cfg: DictConfig, run_dir: Path, console: Console | None = None, resume: bool = False) -> int:
    """`ftlab train`: run (or resume) one job in `run_dir`; returns the exit code (0 ok, 1 failed, 130 cancelled,
    75 stopped with a checkpoint for Slurm to run it again)."""
    console = console or Console()
    resume = resume or resumes_after_requeue(run_dir)
    group = init_process_group(resolve_runtime(cfg.train).device)
    record_dir, checkpoints_dir = Path(run_dir), Path(run_dir) / "checkpoints"
    if not group.is_main:  # other ranks compute only; their scratch record is removed at the end
        record_dir, resume, console = Path(tempfile.mkdtemp(prefix=f"ftlab-rank{group.rank}-")), False, Console(quiet=True)
    stops = StopSignals().install()
    job = FineTuningJob(cfg, record_dir, console, resume=resume, group=group,
                        checkpoints_dir=checkpoints_dir if resume or not group.is_main else None, stops=stops)
    lock = RunLock(record_dir)
    try:
        lock.acquire(handed=group.is_main and os.environ.get(HANDED_LOCK_ENV) == "1")
    except Exception as error:  # noqa: BLE001 - the lock holder's job is left untouched
        code = getattr(error, "code", "locked")
        console.print(f"[red]refused[/] {escape(f'[{code}] {error}')}")
        stops.restore()
        return 1
    status = "failed"
    try:
        job.setup()
        job.train()
        job.finish()
        status = "succeeded"
        job.cleanup(status)
    except (KeyboardInterrupt, JobCancelled) as stop:
        if slurm_runs_it_again(stops.received):
            job.cleanup("requeued", reason=str(stop))
            console.print(f"[yellow]requeued[/] at step {job.step}: Slurm runs the job again and it resumes")
            stops.pass_on()
            return REQUEUED_EXIT
        status = "cancelled"
        job.cleanup(status, reason=str(stop))
        console.print(f"[yellow]cancelled[/] at step {job.step}; resume with: ftlab train resume={run_dir}")
        return 130
    except Exception as error:  # noqa: BLE001 - every failure is recorded in the job before exit
        code = getattr(error, "code", None) or type(error).__name__
        message = getattr(error, "message", None) or str(error)
        if _is_out_of_memory(error):
            code, message = "out_of_memory", f"{OUT_OF_MEMORY_HELP} ({message.splitlines()[0][:200]})"
        job.cleanup(status, error={"code": code, "message": message, "param": None})
        console.print(f"[red]failed[/] {escape(f'[{code}] {message}')}")
        if not isinstance(error, JobFailed) and code != "out_of_memory" and not hasattr(type(error), "code"):
            console.print_exception(max_frames=8)
        return 1
    finally:
        stops.restore()
        lock.release()
        destroy(group)
        if not group.is_main:
            shutil.rmtree(record_dir, ignore_errors=True)
    console.print(f"[green]succeeded[/] {job.job.record['fine_tuned_model']}  ({job.job.id}, run dir {run_dir})")
    return 0
