"""The models `ftlab serve` answers chat and completion requests with.

One backbone in memory serves every adapter trained on it (PEFT multi-adapter): a model name
resolves to a `Target` (backbone, format, the job's own tokenizer and template, the adapter to
apply); `ModelPool.using(target)` hands out the model with that adapter active, or with adapters
disabled for a bare family (`gpt-3.5-turbo`, `babbage-002`, …: the server's backbone alone).

- Nothing loads at import or at start: a backbone loads on the first request that needs it, an
  adapter on the first request for its model.
- At most `server.max_loaded_models` adapters stay loaded per backbone; the least recently used
  one is unloaded (`delete_adapter`) when another is needed. At most `MAX_BACKBONES` backbones
  stay in memory (keyed by the backbone's config), the least recently used one goes first.
- One lock around model use: requests take turns (each request's `n` choices are one batch), so
  no two requests ever share the model's active adapter.
"""
import gc
import hashlib
import itertools
import json
import logging
import threading
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("ftlab.serve")

MAX_BACKBONES = 1  # backbones kept in memory at once (one is the usual case: every job on the server's backbone)


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


@dataclass
class _Backbone:
    base: object  # the backbone module
    model: object  # the backbone, or the PeftModel wrapping it once an adapter was loaded
    adapters: "OrderedDict[str, str]" = field(default_factory=OrderedDict)  # adapter key → PEFT adapter name, LRU first


def _family_configs() -> dict[str, DictConfig]:
    from trainer.compose import CONFIG_DIR

    return {path.stem: OmegaConf.load(path) for path in sorted((Path(CONFIG_DIR) / "model").glob("*.yaml"))}


def _backbone_key(cfg: DictConfig) -> str:
    spec = json.dumps(OmegaConf.to_container(cfg.backbone, resolve=True), sort_keys=True, default=str)
    return f"{cfg.backbone.name}@{hashlib.sha256(spec.encode()).hexdigest()[:10]}"


class ModelPool:
    """Resolves model names and lends out the backbone with the right adapter, one request at a time."""

    def __init__(self, cfg: DictConfig, root):
        self.cfg = cfg
        self.root = Path(root)
        self.max_adapters = max(1, int(OmegaConf.select(cfg, "server.max_loaded_models", default=4) or 1))
        self.lock = threading.Lock()  # model use (generation, loading, adapter switches)
        self._meta = threading.Lock()  # the caches below
        self._resolving = threading.Lock()  # name → target (loads tokenizers)
        self._families: Optional[dict[str, DictConfig]] = None
        self._targets: dict[str, Target] = {}
        self._tokenizers: dict[str, object] = {}  # backbone key or run dir → tokenizer
        self._contexts: dict[str, int] = {}  # backbone key → max positions
        self._backbones: "OrderedDict[str, _Backbone]" = OrderedDict()
        self._forgotten: set[str] = set()  # adapter dirs to unload at the next turn
        self._names = (f"adapter{i}" for i in itertools.count())
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
        """A model taken out of service: drop its name and its checkpoints' names, and unload their adapters at
        the next turn."""
        with self._meta:
            for known in [known for known in self._targets if known == name or known.startswith(f"{name}:ckpt-step-")]:
                target = self._targets.pop(known)
                if target.adapter_key is not None:
                    self._forgotten.add(target.adapter_key)

    # ---- weights -----------------------------------------------------------------------------
    @contextmanager
    def using(self, target: Target):
        """The model with the target's adapter active (adapters disabled for a bare family), for this turn only."""
        with self.lock:
            if self.closed:
                raise RuntimeError("the server is shutting down")
            backbone = self._backbone(target)
            self._drop_forgotten(backbone)
            if target.adapter_dir is None:
                if backbone.adapters:
                    with backbone.model.disable_adapter():
                        yield backbone.model
                else:
                    yield backbone.model
                return
            self._activate(backbone, target)
            yield backbone.model

    def _backbone(self, target: Target) -> _Backbone:
        found = self._backbones.get(target.backbone_key)
        if found is not None:
            self._backbones.move_to_end(target.backbone_key)
            return found
        while len(self._backbones) >= MAX_BACKBONES:
            old, _ = self._backbones.popitem(last=False)
            log.info("unloading backbone %s", old)
            self._free()
        runtime = self._runtime()
        log.info("loading backbone %s (%s, %s)", target.backbone_key, runtime.device, runtime.precision_name)
        from trainer.model import load_base_model

        model = load_base_model(target.load_cfg, runtime)
        model.eval()
        backbone = self._backbones[target.backbone_key] = _Backbone(model, model)
        return backbone

    def _runtime(self):
        """Where the backbones compute: the server's `train.device` / `precision` / `quantization`, except that
        `precision=auto` on a CPU serves in fp32. Token-by-token decoding in bf16 on a CPU runs at erratic
        speeds here (SmolLM2-135M, 32 tokens: 0.8 s to 38 s for the same prompt; fp32: 1.4 s every time)."""
        import dataclasses

        import torch

        from trainer.model import resolve_runtime
        from trainer.schema import Precision

        runtime = resolve_runtime(self.cfg.train)
        if runtime.device == "cpu" and self.cfg.train.precision == Precision.auto and runtime.dtype != torch.float32:
            runtime = dataclasses.replace(runtime, dtype=torch.float32)
        return runtime

    def _activate(self, backbone: _Backbone, target: Target) -> None:
        key = target.adapter_key
        if key in backbone.adapters:
            backbone.adapters.move_to_end(key)
        else:
            name = next(self._names)
            log.info("loading adapter %s for %s", target.adapter_dir, target.name)
            if not backbone.adapters and backbone.model is backbone.base:
                from peft import PeftModel

                backbone.model = PeftModel.from_pretrained(backbone.base, str(target.adapter_dir), adapter_name=name)
                backbone.model.eval()
            else:
                backbone.model.load_adapter(str(target.adapter_dir), adapter_name=name)
            backbone.adapters[key] = name
        backbone.model.set_adapter(backbone.adapters[key])
        while len(backbone.adapters) > self.max_adapters:
            old, name = backbone.adapters.popitem(last=False)
            log.info("unloading adapter %s", old)
            backbone.model.delete_adapter(name)

    def _drop_forgotten(self, backbone: _Backbone) -> None:
        with self._meta:
            forgotten, self._forgotten = self._forgotten, set()
        for key in forgotten:
            name = backbone.adapters.get(key)
            if name is not None and len(backbone.adapters) > 1:  # the last one stays (inactive) until evicted
                del backbone.adapters[key]
                backbone.model.set_adapter(next(reversed(backbone.adapters.values())))  # never delete the active one
                backbone.model.delete_adapter(name)

    def loaded(self) -> dict[str, list[str]]:
        """Backbone key → the adapter dirs loaded on it, least recently used first."""
        with self._meta:
            return {key: [adapter.rsplit("@", 1)[0] for adapter in backbone.adapters]
                    for key, backbone in self._backbones.items()}

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
        """Free the models (waits a little for a request in progress)."""
        got = self.lock.acquire(timeout=10)
        try:
            self.closed = True
            self._backbones.clear()
            with self._meta:
                self._targets.clear()
                self._tokenizers.clear()
            self._free()
        finally:
            if got:
                self.lock.release()
