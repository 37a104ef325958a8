"""`ftlab <verb> [hydra overrides...]`: every verb is the same Hydra app over conf/config.yaml.

    ftlab train data=terse train.n_epochs=2     # also the default verb; -m for a sweep
    ftlab validate data.train_file=mine.jsonl
    ftlab estimate model=davinci-002 data=classify
"""
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from trainer.schema import register_configs

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "conf")
_exit_codes: list[int] = []


def _run_dir() -> Path:
    return Path(HydraConfig.get().runtime.output_dir)


def train(cfg: DictConfig) -> int:
    """Validate, estimate, then train a LoRA adapter; the run dir is the job record."""
    from trainer.train import run_training

    return run_training(cfg, _run_dir())


def validate(cfg: DictConfig) -> int:
    """Check the training and validation files as the hosted service does; write validation.json."""
    from trainer.preflight import validate_main

    return validate_main(cfg)


def estimate(cfg: DictConfig) -> int:
    """Count billed tokens and price the job (hosted price and local run); load no model."""
    from trainer.preflight import estimate_main

    return estimate_main(cfg)


VERBS = {"train": train, "validate": validate, "estimate": estimate}


def _usage() -> str:
    lines = ["usage: ftlab <verb> [hydra overrides...]   (verb defaults to train)", "", "verbs:"]
    lines += [f"  {name:<10} {function.__doc__.splitlines()[0]}" for name, function in VERBS.items()]
    lines += ["", "examples:", "  ftlab train data=terse train.max_steps=20",
              "  ftlab train -m train.learning_rate_multiplier=0.5,2", "  ftlab estimate data=custom data.train_file=x.jsonl",
              "  ftlab train --cfg job     # print the composed config"]
    return "\n".join(lines)


def _quiet_libraries() -> None:
    """Keep the terminal for ftlab's own progress: no per-shard bars or kernel hints from libraries."""
    import logging
    import warnings

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()


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
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    _quiet_libraries()
    register_configs()
    function = VERBS[verb]

    def task(cfg: DictConfig) -> int:
        code = function(cfg)
        _exit_codes.append(code)
        return code

    app = hydra.main(config_path=CONFIG_DIR, config_name="config", version_base="1.3")(task)
    sys.argv = [f"ftlab {verb}", *args, f"hydra.job.name={verb}"]
    app()
    sys.exit(max(_exit_codes, default=0))
