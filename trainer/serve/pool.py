"""The models `ftlab serve` answers chat and completion requests with.

One backbone in memory serves every adapter trained on it: a model name resolves to a `Target`
(backbone, format, the job's own tokenizer and template, the adapter to apply), and
`ModelPool.submit` queues a generation on that backbone's decoding engine (`trainer.engine`),
where requests for the bare family (`gpt-3.5-turbo`, `babbage-002`, …: no adapter) and for any
number of `ft:` models share one batch, each row with its own adapter.

- Nothing loads at import or at start: a backbone loads on the first request that needs it, an
  adapter on the first request for its model.
- At most `server.max_loaded_models` adapters stay loaded per backbone; the least recently used
  one no request is using is unloaded when another is needed. At most `MAX_BACKBONES` backbones
  stay in memory (keyed by the backbone's config); another backbone waits until the current
  one's requests are done (`BackboneBusy` after `BACKBONE_SWITCH_WAIT_S`).
- `server.max_batch_size` rows decode together; `server.max_queue` requests may wait for a place,
  after which `submit` refuses with `QueueFull` (the API answers 429 with Retry-After).
"""
import gc
import hashlib
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("ftlab.serve")

MAX_BACKBONES = 1  # backbones kept in memory at once (one is the usual case: every job on the server's backbone)
BACKBONE_SWITCH_WAIT_S = 60  # how long a request for another backbone waits for the current one's requests


class BackboneBusy(RuntimeError):
    """Another backbone holds the model memory and is still answering requests."""


class ModelNotFound(LookupError):
    """A name that is neither a model family nor a usable fine-tuned model (or checkpoint)."""


@dataclass
class Target:
    """What a model name stands for: how to render its prompts and which weights answer."""

    name: str  # as requested
    chat: bool  # chat format (else prompt/completion)
    family: str  # the hosted model family (gpt-3.5-turbo, babbage-002, …)
    backbone_key: str
    load_cfg: DictConfig = field(repr=False)  # a config whose backbone/cache_dir load the backbone
    tokenizer: object = field(repr=False)
    stop_token_ids: list[int] = field(default_factory=list)
    adapter_dir: Optional[Path] = None  # None: the backbone alone
    adapter_key: Optional[str] = None  # adapter dir + weights' mtime: a rewritten adapter is loaded again
    context_length: int = 4096
    encode_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def encode_chat(self, messages: list[dict], tools: Optional[list] = None) -> list[int]:
        from trainer.inference import encode_chat_prompt

        with self.encode_lock:
            return encode_chat_prompt(self.tokenizer, messages, tools)

    def encode_prompt(self, prompt: str) -> list[int]:
        from trainer.inference import encode_completion_prompt

        with self.encode_lock:
            return encode_completion_prompt(self.tokenizer, prompt)


def _family_configs() -> dict[str, DictConfig]:
    from trainer.compose import CONFIG_DIR

    return {path.stem: OmegaConf.load(path) for path in sorted((Path(CONFIG_DIR) / "model").glob("*.yaml"))}


def _backbone_key(cfg: DictConfig) -> str:
    spec = json.dumps(OmegaConf.to_container(cfg.backbone, resolve=True), sort_keys=True, default=str)
    return f"{cfg.backbone.name}@{hashlib.sha256(spec.encode()).hexdigest()[:10]}"


class ModelPool:
    """Resolves model names, and queues generations on each backbone's decoding engine."""

    def __init__(self, cfg: DictConfig, root):
        self.cfg = cfg
        self.root = Path(root)
        self.max_adapters = max(1, int(OmegaConf.select(cfg, "server.max_loaded_models", default=4) or 1))
        self._loading = threading.Lock()  # backbone loads and unloads
        self._meta = threading.Lock()  # the caches below
        self._resolving = threading.Lock()  # name → target (loads tokenizers)
        self._families: Optional[dict[str, DictConfig]] = None
        self._targets: dict[str, Target] = {}
        self._tokenizers: dict[str, object] = {}  # backbone key or run dir → tokenizer
        self._contexts: dict[str, int] = {}  # backbone key → max positions
        self._engines: dict[str, object] = {}  # backbone key → its decoding engine
        self.closed = False

    # ---- names -------------------------------------------------------------------------------
    def families(self) -> dict[str, DictConfig]:
        if self._families is None:
            self._families = _family_configs()
        return self._families

    def target(self, name: str) -> Target:
        """The target a model name stands for; `ModelNotFound` if it is not a family or a usable `ft:` model."""
        with self._meta:
            known = self._targets.get(name)
        if known is not None and (known.adapter_dir is None or self._adapter_key(known.adapter_dir) == known.adapter_key):
            return known
        with self._resolving:  # one at a time: first imports of transformers are not thread-safe
            target = self._family_target(name) if name in self.families() else self._job_target(name)
        with self._meta:
            self._targets[name] = target
        return target

    def _family_target(self, name: str) -> Target:
        from trainer.model import load_tokenizer

        family = self.families()[name]
        key = _backbone_key(self.cfg)
        tokenizer = self._tokenizer(key, lambda: load_tokenizer(self.cfg))
        return self._make_target(name, str(family.format) == "chat", str(family.name), key, self.cfg, tokenizer,
                                 int(family.context_length), None)

    def _job_target(self, name: str) -> Target:
        from trainer.inference import load_job_tokenizer
        from trainer.jobs import JobNotFound, load_job_config, require_adapter, resolve_job
        from trainer.schema import DataFormat

        if not name.startswith("ft:"):
            raise ModelNotFound(name)
        try:
            job = require_adapter(resolve_job(name, str(self.root), paths=False))
            job_cfg = load_job_config(job)
        except JobNotFound as error:
            raise ModelNotFound(name) from error
        if job.checkpoint_step is None and job.record.get("fine_tuned_model") != name:
            raise ModelNotFound(name)
        if not Path(str(job_cfg.cache_dir)).expanduser().is_dir():
            job_cfg.cache_dir = self.cfg.cache_dir  # trained elsewhere: the server's cache holds the backbone
        key = _backbone_key(job_cfg)
        tokenizer = self._tokenizer(f"{key}|{job.run_dir}", lambda: load_job_tokenizer(job_cfg, job))
        return self._make_target(name, job_cfg.model.format == DataFormat.chat, str(job_cfg.model.name), key,
                                 job_cfg, tokenizer, int(job_cfg.model.context_length), job.adapter_dir)

    def _make_target(self, name, chat, family, key, load_cfg, tokenizer, context_length, adapter_dir) -> Target:
        from trainer.inference import end_of_turn_ids

        positions = self._positions(key, load_cfg)
        return Target(name=name, chat=chat, family=family, backbone_key=key, load_cfg=load_cfg, tokenizer=tokenizer,
                      stop_token_ids=end_of_turn_ids(tokenizer, chat), adapter_dir=adapter_dir,
                      adapter_key=self._adapter_key(adapter_dir) if adapter_dir is not None else None,
                      context_length=min(context_length, positions) if positions else context_length)

    @staticmethod
    def _adapter_key(adapter_dir: Path) -> Optional[str]:
        weights = [adapter_dir / "adapter_model.safetensors", adapter_dir / "adapter_model.bin"]
        stamps = [str(path.stat().st_mtime_ns) for path in weights if path.is_file()]
        if not (adapter_dir / "adapter_config.json").is_file() or not stamps:
            return None
        return f"{adapter_dir}@{stamps[0]}"

    def _tokenizer(self, key: str, load):
        with self._meta:
            found = self._tokenizers.get(key)
        if found is None:
            found = load()
            with self._meta:
                found = self._tokenizers.setdefault(key, found)
        return found

    def _positions(self, key: str, load_cfg: DictConfig) -> Optional[int]:
        """The backbone's own position limit (config.json's max_position_embeddings), when it says."""
        if key not in self._contexts:
            from trainer.model import backbone_folder

            try:
                config = json.loads((Path(backbone_folder(load_cfg)) / "config.json").read_text())
                positions = config.get("max_position_embeddings") or config.get("n_positions") or 0
            except (OSError, ValueError):
                positions = 0
            self._contexts[key] = int(positions)
        return self._contexts[key] or None

    def forget(self, name: str) -> None:
        """A model taken out of service: drop its name and its checkpoints' names, and unload their adapters once
        no request uses them."""
        with self._meta:
            known = [known for known in self._targets if known == name or known.startswith(f"{name}:ckpt-step-")]
            keys = {self._targets.pop(known).adapter_key for known in known} - {None}
            engines = list(self._engines.values())
        for engine in engines:
            for key in keys:
                engine.forget(key)

    # ---- generating --------------------------------------------------------------------------
    def submit(self, target: Target, prompt_ids: list[int], sampling, constraint=None, loop=None):
        """Queue a generation on the target's backbone (loaded at its first request; the caller's thread waits
        for that); returns the engine's `Generation`. `QueueFull` when `server.max_queue` requests wait."""
        from trainer.engine import Adapter, Request

        adapter = Adapter(target.adapter_key, target.adapter_dir) if target.adapter_dir is not None else None
        request = Request(prompt_ids, sampling, target.tokenizer, target.stop_token_ids, adapter, constraint)
        return self.engine(target).submit(request, loop=loop)

    def judge(self, model: str, messages: list[dict], sampling_params: dict):
        """A model grader's judge (`trainer.graders.Judge`): `model` (a chat family or ft: model) answers the
        messages, greedily unless `sampling_params` say otherwise; the caller's thread waits for the answer."""
        from trainer.engine import Sampling
        from trainer.graders import JudgeReply

        target = self.target(model)
        if not target.chat:
            raise ModelNotFound(f"{model} is not a chat model: a model grader's judge must be one")
        prompt_ids = target.encode_chat(messages)
        room = target.context_length - len(prompt_ids)
        if room < 1:
            raise ValueError(f"the grader's messages take {len(prompt_ids)} tokens, over {model}'s context")
        sampling = Sampling(max_new_tokens=min(int(sampling_params.get("max_completions_tokens") or 256), room),
                           temperature=float(sampling_params.get("temperature") or 0.0),
                           top_p=float(sampling_params.get("top_p") or 1.0), seed=sampling_params.get("seed"))
        (choice,) = self.submit(target, prompt_ids, sampling).result()
        return JudgeReply(choice.text, len(prompt_ids), choice.n_tokens)

    def engine(self, target: Target):
        """The decoding engine of the target's backbone, loading the backbone the first time."""
        from trainer.engine import EngineClosed

        with self._loading:  # one backbone load at a time
            if self.closed:
                raise EngineClosed("the server is shutting down")
            with self._meta:
                engine = self._engines.get(target.backbone_key)
            if engine is not None:
                return engine
            for key, old in list(self._engines.items())[: max(0, len(self._engines) - MAX_BACKBONES + 1)]:
                self._unload_when_idle(key, old)
            engine = self._load(target)
            with self._meta:
                self._engines[target.backbone_key] = engine
            return engine

    def _unload_when_idle(self, key: str, engine) -> None:
        """Make room for another backbone once this one's requests are done."""
        deadline = time.monotonic() + BACKBONE_SWITCH_WAIT_S
        while engine.busy:
            if time.monotonic() > deadline:
                raise BackboneBusy(f"the server's model memory holds another backbone ({key}) that is still "
                                   "answering requests; retry shortly")
            time.sleep(0.05)
        log.info("unloading backbone %s", key)
        engine.close()
        with self._meta:
            del self._engines[key]
        self._free()

    def _load(self, target: Target):
        from trainer.engine import Engine
        from trainer.model import load_base_model

        runtime = self._runtime()
        log.info("loading backbone %s (%s, %s)", target.backbone_key, runtime.device, runtime.precision_name)
        model = load_base_model(target.load_cfg, runtime).requires_grad_(False)  # served, never trained
        model.eval()
        server = self.cfg.server
        return Engine(model, max_batch_size=int(server.max_batch_size), max_queue=int(server.max_queue),
                      max_adapters=self.max_adapters)

    def _runtime(self):
        """Where the backbones compute: the server's `train.device` / `precision` / `quantization`, except that
        `precision=auto` on a CPU serves in fp32, the precision whose greedy answers the tests pin."""
        import dataclasses

        import torch

        from trainer.model import resolve_runtime
        from trainer.schema import Precision

        runtime = resolve_runtime(self.cfg.train)
        if runtime.device == "cpu" and self.cfg.train.precision == Precision.auto and runtime.dtype != torch.float32:
            runtime = dataclasses.replace(runtime, dtype=torch.float32)
        return runtime

    @property
    def busy(self) -> bool:
        """Whether any backbone's engine is generating or has requests waiting."""
        with self._meta:
            engines = list(self._engines.values())
        return any(engine.busy for engine in engines)

    def loaded(self) -> dict[str, list[str]]:
        """Backbone key → the adapter dirs loaded on it, least recently used first."""
        with self._meta:
            return {key: [adapter.rsplit("@", 1)[0] for adapter in engine.adapters]
                    for key, engine in self._engines.items()}

    @staticmethod
    def _free() -> None:
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:
            pass

    def close(self) -> None:
        """Stop the engines (requests still running end with an error) and free the models."""
        self.closed = True
        with self._meta:
            engines, self._engines = list(self._engines.values()), {}
            self._targets.clear()
            self._tokenizers.clear()
        for engine in engines:
            engine.close()
        self._free()
