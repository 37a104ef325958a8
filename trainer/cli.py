"""`ftlab <verb> [hydra overrides...]`: every verb is the same Hydra app over conf/config.yaml.

    ftlab train data=terse train.n_epochs=2     # also the default verb; -m for a sweep
    ftlab validate data.train_file=mine.jsonl
    ftlab estimate model=davinci-002 data=classify
    ftlab chat job=latest prompt="Hugo Alvarez | Maple Ridge Dental | Porto"
    ftlab jobs list --json
"""
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from trainer.compose import CONFIG_DIR, quote_value
from trainer.preemption import REQUEUED_EXIT, requeue_unless_under_way
from trainer.schema import register_configs

_exit_codes: list[int] = []


def _run_dir() -> Path:
    return Path(HydraConfig.get().runtime.output_dir)


def train(cfg: DictConfig) -> int:
    """Validate, estimate, then train a LoRA adapter; the run dir is the job record."""
    if cfg.resume:
        from trainer.jobs import load_job_config, resolve_job

        job = resolve_job(cfg.resume, cfg.get("jobs_root"))
        overrides = tuple(o for o in _overrides() if not o.startswith(("resume=", "jobs_root=")))
        refused = [o.split("=", 1)[0] for o in overrides if o.split("=", 1)[0] not in RESUME_OVERRIDES]
        if refused:
            print(f"ftlab: [resume_override] {', '.join(refused)} cannot change when a job resumes: it keeps the "
                  f"settings it was created with. These can: {', '.join(RESUME_OVERRIDES)}", file=sys.stderr)
            return 2
        cfg = load_job_config(job, cfg, overrides)
        _import_only_what_the_job_uses(cfg)
        from trainer.train import run_training

        return run_training(cfg, job.run_dir, resume=True)
    _import_only_what_the_job_uses(cfg)
    from trainer.request import with_request
    from trainer.train import run_training  # after the line above: it imports transformers' modeling code

    return run_training(with_request(cfg), _run_dir())


def _import_only_what_the_job_uses(cfg: DictConfig) -> None:
    """In a single-job process, skip the packages its job never uses (a sweep's jobs may differ)."""
    from hydra.types import RunMode

    from trainer.model import resolve_runtime, skip_unused_imports

    if HydraConfig.get().mode == RunMode.RUN:
        skip_unused_imports(resolve_runtime(cfg.train))


def _import_only_what_the_model_uses(cfg: DictConfig) -> None:
    """Before chat, complete, eval or export load a job's model: skip the packages that model never uses
    (bitsandbytes and Triton for a CPU model without 4-bit weights: ~1 s of every command)."""
    from trainer.jobs import JobNotFound, load_job_config, resolve_job

    try:
        model_cfg = cfg if not cfg.job or str(cfg.job) == "base" else load_job_config(resolve_job(cfg.job, cfg.jobs_root))
    except (JobNotFound, OSError, ValueError):
        return  # the command itself says what is wrong with job=
    _import_only_what_the_job_uses(model_cfg)


# what a resumed job may change: how long it runs and how it records, never what it learns from
RESUME_OVERRIDES = ("train.max_steps", "train.checkpoint_every", "train.keep_checkpoints", "train.eval_every",
                    "train.max_nonfinite_steps", "train.micro_batch_size", "cache_dir")


def _resume_args(args: list[str]) -> list[str]:
    """`train resume=<run dir | job id>` runs Hydra in the job's own run dir and keeps its .hydra/ as it is."""
    from trainer.jobs import JobNotFound, resolve_job

    reference = next((arg.split("=", 1)[1] for arg in args if arg.startswith("resume=")), None)
    if reference is None:
        return args
    root = next((arg.split("=", 1)[1] for arg in args if arg.startswith("jobs_root=")), None)
    try:
        run_dir = resolve_job(reference, root).run_dir
    except JobNotFound as error:
        print(f"ftlab: resume={reference}: {error}", file=sys.stderr)
        sys.exit(2)
    rest = [arg for arg in args if not arg.startswith("resume=")]
    return [f"resume={quote_value(str(run_dir))}", f"hydra.run.dir={quote_value(str(run_dir))}", "hydra.output_subdir=null", *rest]


def validate(cfg: DictConfig) -> int:
    """Check the training and validation files as the hosted service does; write validation.json."""
    from trainer.preflight import validate_main

    return validate_main(cfg)


def estimate(cfg: DictConfig) -> int:
    """Count billed tokens and price the job (hosted price and local run); load no model."""
    from trainer.preflight import estimate_main

    return estimate_main(cfg)


def chat(cfg: DictConfig) -> int:
    """Talk to a fine-tuned chat model: job=<id|ft:name|run dir|latest|base> [prompt=...]."""
    _import_only_what_the_model_uses(cfg)
    from trainer.chat import chat_main

    return chat_main(cfg, _overrides())


def complete(cfg: DictConfig) -> int:
    """Complete prompts with a prompt/completion (babbage/davinci-style) job: job=... [prompt=...]."""
    _import_only_what_the_model_uses(cfg)
    from trainer.chat import complete_main

    return complete_main(cfg, _overrides())


def evaluate(cfg: DictConfig) -> int:
    """Base vs fine-tuned on the validation file: loss, accuracy, task metrics, prompt savings; eval.json."""
    _import_only_what_the_model_uses(cfg)
    from trainer.evaluate import evaluate_main

    return evaluate_main(cfg, _overrides())


def export(cfg: DictConfig) -> int:
    """Merge the adapter into a full model in <run dir>/merged/ (safetensors, for transformers or vLLM)."""
    _import_only_what_the_model_uses(cfg)
    from trainer.export import export_main

    return export_main(cfg, _overrides())


def serve(cfg: DictConfig) -> int:
    """The hosted fine-tuning API (files, jobs, models, chat) for the official openai client: server.port=8000."""
    from trainer.openmp import spin_idle_threads

    spin_idle_threads()  # before torch loads: the engine decodes in a thread of its own
    from trainer.serve.app import serve_main

    return serve_main(cfg, _overrides())


def grade(cfg: DictConfig) -> int:
    """Run a grader over samples: grader=<grader.json> samples=<samples.jsonl> (as the graders API runs it)."""
    from trainer.grading import grade_main

    return grade_main(cfg)


def jobs(args: list[str]) -> int:
    """List and inspect jobs: jobs list [limit=N after=ID] | show|events|checkpoints <job> [--json]."""
    from trainer.jobs import jobs_main

    return jobs_main(args)


def _overrides() -> tuple[str, ...]:
    return tuple(HydraConfig.get().overrides.task)


VERBS = {"train": train, "validate": validate, "estimate": estimate, "chat": chat, "complete": complete,
         "eval": evaluate, "export": export, "grade": grade, "jobs": jobs, "serve": serve}
SETTINGS_VERBS = {"validate", "estimate"}  # check the job's settings first (train records the refusal in its job)
NO_HYDRA = {"jobs"}  # plain argument parsing, no config composition
USE_VERBS = {"chat", "complete", "eval", "export"}  # results go to the job's run dir, so no run dir of their own
NO_RUN_DIR = USE_VERBS | {"serve", "grade"}  # write nothing of Hydra's own (the server's jobs have their run dirs)
FREE_TEXT_KEYS = ("prompt=", "system=", "job=", "grader=", "samples=")  # values taken verbatim (commas, quotes, colons) and quoted for Hydra


def _use_verb_args(args: list[str]) -> list[str]:
    """Quote free-text values; write nothing of Hydra's own (no .hydra/, no log file) unless asked."""
    args = [arg.split("=", 1)[0] + "=" + quote_value(arg.split("=", 1)[1]) if arg.startswith(FREE_TEXT_KEYS) else arg
            for arg in args]
    defaults = {"hydra.output_subdir": "null", "hydra/job_logging": "stdout", "hydra.run.dir": "."}
    given = {arg.split("=", 1)[0].lstrip("+~") for arg in args}
    return [f"{key}={value}" for key, value in defaults.items() if key not in given] + args


def _usage() -> str:
    lines = ["usage: ftlab <verb> [hydra overrides...]   (verb defaults to train)", "", "verbs:"]
    lines += [f"  {name:<10} {function.__doc__.splitlines()[0]}" for name, function in VERBS.items()]
    lines += ["", "examples:", "  ftlab train data=terse train.max_steps=20",
              "  ftlab train -m train.learning_rate_multiplier=0.5,2", "  ftlab estimate data=custom data.train_file=x.jsonl",
              "  ftlab chat job=latest prompt='Hugo Alvarez | Maple Ridge Dental | Porto'",
              "  ftlab eval job=latest eval.max_examples=8", "  ftlab export job=latest", "  ftlab jobs list --json",
              "  ftlab serve jobs_root=~/ftlab-jobs    # OpenAI(base_url='http://127.0.0.1:8000/v1')",
              "  ftlab train --cfg job     # print the composed config"]
    return "\n".join(lines)


def _quiet_libraries() -> None:
    """Keep the terminal for ftlab's own progress: no per-shard bars or kernel hints from libraries."""
    import logging
    import warnings

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' own bars follow this too
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # read when transformers is first imported, not before
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: pick the verb, hand the rest to Hydra, exit with the job's code."""
    args = list(sys.argv[1:] if argv is None else argv)
    verb = "train"
    if args and args[0] in ("help", "-h", "--help") :
        print(_usage())
        return
    if args and not args[0].startswith("-") and "=" not in args[0]:
        verb = args.pop(0)
        if verb not in VERBS:
            print(f"ftlab: unknown verb '{verb}'. Choose one of: {', '.join(VERBS)}\n\n{_usage()}", file=sys.stderr)
            sys.exit(2)
    if verb in NO_HYDRA:
        sys.exit(VERBS[verb](args))
    if verb in NO_RUN_DIR:
        args = _use_verb_args(args)
    if verb == "train":
        args = _resume_args(args)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    _quiet_libraries()
    register_configs()
    function = VERBS[verb]

    def task(cfg: DictConfig):
        if verb in SETTINGS_VERBS:
            from trainer.hyperparams import SettingsError, check_job_settings

            try:
                check_job_settings(cfg)
            except SettingsError as error:
                print(f"ftlab: [{error.code}] {error}", file=sys.stderr)
                _exit_codes.append(2)
                return 2
        code = function(cfg)
        if code == REQUEUED_EXIT:  # Slurm runs this job again: end the process now, so that submitit records no
            requeue_unless_under_way()  # result for it (a sweep's job runs in submitit's process; its launcher
            sys.exit(code)  # waits on)
        _exit_codes.append(code)
        if verb == "train" and not cfg.resume:
            from trainer.sweep import objective

            return objective(_run_dir())  # what a sweeper (hparams_search=optuna) minimises
        return code

    app = hydra.main(config_path=CONFIG_DIR, config_name="config", version_base="1.3")(task)
    sys.argv = [f"ftlab {verb}", *args, f"hydra.job.name={verb}"]
    app()
    from trainer.sweep import FAILED_JOBS

    sys.exit(max([*_exit_codes, 1 if FAILED_JOBS else 0]))


def run() -> None:
    """The `ftlab` program (and `python -m trainer`): `main` with fewer full garbage collections, then
    the end of the process without tearing the interpreter down.

    Freeing every module and tensor one by one took ~1.5 s after a 20-step CPU job on the embedded
    backbone (a tenth of its run; README, Performance). Everything ftlab writes is closed by then,
    so once the exit hooks have run and the streams are flushed, the process ends at once. A
    process still running threads of its own exits the usual way, which waits for them.
    """
    import atexit
    import gc
    import logging
    import threading

    # Starting a job creates millions of objects and little garbage (torch, transformers, the
    # backbone): with the default thresholds a full collection ran 8 times while it did, each
    # scanning every object so far, ~1 s in all. Full collections still run, after 1,000
    # young-generation ones instead of 10 (every few minutes of a long job).
    gc.set_threshold(*gc.get_threshold()[:2], 1000)
    try:
        main()
        code = 0
    except SystemExit as done:
        if done.code is not None and not isinstance(done.code, int):
            print(done.code, file=sys.stderr)
        code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    if any(thread.is_alive() and not thread.daemon and thread is not threading.main_thread()
           for thread in threading.enumerate()):
        sys.exit(code)
    atexit._run_exitfuncs()  # what exiting would run: wandb's, multiprocessing's, the libraries' own hooks
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
