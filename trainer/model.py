"""The model stage: resolve the device and precision, load the backbone (4-bit NF4 when asked),
and wrap it in a LoRA adapter."""
import sys
from dataclasses import dataclass

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from trainer.schema import Device, Distributed, Precision, Quantization


@dataclass
class Runtime:
    """Where and how the job computes: resolved from the `auto` settings in config."""

    device: str  # cpu | cuda
    dtype: torch.dtype  # compute dtype
    quantization: str  # none | nf4

    @property
    def precision_name(self) -> str:
        return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX), where bf16 beats fp32."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)


def keep_cpu_memory_flat() -> bool:
    """Keep a training process's resident memory from creeping up step after step (Linux, glibc).

    Every step allocates tensors of new shapes. By default oneDNN caches 1024 primitives (one set
    per shape) and glibc keeps freed heap memory for reuse. oneDNN now keeps 128 (unless
    ONEDNN_PRIMITIVE_CACHE_CAPACITY is set) and glibc trims the heap at once. Returns whether
    glibc took the setting. (Serving large blocks from mmap flattens memory further but costs
    ~80% in speed on CPU: page faults on every activation.) Figures: README, Performance.
    """
    import ctypes
    import ctypes.util
    import os

    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "128")  # read when oneDNN builds its first primitive
    m_trim_threshold = -1  # from glibc's malloc.h
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(m_trim_threshold, 0))
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to tune
        return False


GPU_ONLY_PACKAGES = ("bitsandbytes", "triton")
UNUSED_PACKAGES = ("scipy",)  # transformers imports scipy.optimize for its object-detection losses, nothing else


def skip_unused_imports(runtime: Runtime) -> list[str]:
    """Make packages this process's job never uses look uninstalled, before anything imports them.

    transformers imports SciPy (0.25 s) whenever it loads its loss code. PEFT imports
    bitsandbytes, and torch._dynamo (which transformers' masking code imports) imports Triton,
    whether or not the job will ever use them: on a CPU job without 4-bit weights that is ~1 s
    and ~100 MiB of nothing (README, Performance). Only a process that runs one job should call
    this. Returns the names hidden.
    """
    hidden = []
    if not any(name in sys.modules for name in ("transformers", *UNUSED_PACKAGES)):  # it asks once, on import
        hidden += UNUSED_PACKAGES
    cpu_only = runtime.device == "cpu" and runtime.quantization == Quantization.none.value
    if cpu_only and not any(name in sys.modules for name in ("peft", "torch._dynamo", *GPU_ONLY_PACKAGES)):
        hidden += GPU_ONLY_PACKAGES  # once imported it is too late: the libraries may already hold references
    for name in hidden:
        sys.modules[name] = None  # `import name` raises ImportError; find_spec(name) returns None
    return list(hidden)


def resolve_runtime(train_cfg: DictConfig) -> Runtime:
    """Resolve `device`, `precision` and `quantization` (each may be `auto`) for this machine."""
    has_cuda = torch.cuda.is_available()
    if train_cfg.device == Device.cuda and not has_cuda:
        raise RuntimeError("train.device=cuda but no CUDA GPU is visible; use train.device=auto or cpu")
    device = "cuda" if train_cfg.device == Device.cuda or (train_cfg.device == Device.auto and has_cuda) else "cpu"
    precision = train_cfg.precision
    if precision == Precision.auto:
        # The backbone is frozen, so holding it in bf16 loses nothing autocast would keep; the
        # LoRA weights and optimizer state stay fp32 (PEFT upcasts adapters).
        native_bf16 = torch.cuda.is_bf16_supported() if device == "cuda" else cpu_has_native_bf16()
        precision = Precision.bf16 if native_bf16 else Precision.fp32
    dtype = {Precision.fp32: torch.float32, Precision.bf16: torch.bfloat16, Precision.fp16: torch.float16}[precision]
    quantization = train_cfg.quantization
    if quantization == Quantization.auto:
        quantization = Quantization.nf4 if device == "cuda" else Quantization.none
    return Runtime(device=device, dtype=dtype, quantization=quantization.value)


def backbone_folder(cfg: DictConfig):
    """The local folder holding the backbone's weights and tokenizer (converted or built if needed)."""
    from hydra.errors import InstantiationException

    from trainer.backbones import BackboneNotFound

    try:
        return instantiate(cfg.backbone.load, cache_dir=cfg.cache_dir)
    except InstantiationException as error:
        if isinstance(error.__cause__, BackboneNotFound):  # show the how-to-fix message, not Hydra's wrapper
            raise error.__cause__ from None
        raise


def load_tokenizer(cfg: DictConfig):
    """The backbone's tokenizer, with a pad token and the chat template that training and chat share."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        str(backbone_folder(cfg)), trust_remote_code=cfg.backbone.trust_remote_code
    )
    if cfg.backbone.chat_template:
        tokenizer.chat_template = cfg.backbone.chat_template
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def disable_cpu_weight_repacking(model: torch.nn.Module) -> int:
    """Stop bitsandbytes from repacking 4-bit weights for AVX512-BF16 on CPU.

    A no-grad forward (eval, generate) repacks Linear4bit weights in place, after which
    backward silently yields zero or wrong LoRA gradients. Returns the number of layers fixed.
    """
    if not getattr(model, "is_loaded_in_4bit", False):
        return 0
    import bitsandbytes as bnb

    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
    return len(layers)


def nf4_config(cfg: DictConfig, runtime: Runtime):
    """QLoRA's quantization: NF4 with double quantization, computing in the runtime's dtype."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=runtime.dtype,
        # FSDP can only shard the 4-bit weights when they are stored in a float container
        bnb_4bit_quant_storage=runtime.dtype if cfg.train.distributed == Distributed.fsdp else torch.uint8,
    )


def quantize_to_nf4(model, config) -> int:
    """Replace every decoder Linear with a bitsandbytes Linear4bit holding the same weights in NF4.

    What `from_pretrained(quantization_config=...)` does while reading a checkpoint, for a model
    already in memory (random weights built on the GPU). The LM head stays in the model's dtype,
    as transformers leaves it. Returns the number of layers quantized.
    """
    import bitsandbytes as bnb

    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not torch.nn.Linear or child is model.get_output_embeddings():
                continue
            layer = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=config.bnb_4bit_compute_dtype,
                                      compress_statistics=config.bnb_4bit_use_double_quant,
                                      quant_type=config.bnb_4bit_quant_type,
                                      quant_storage=config.bnb_4bit_quant_storage, device="meta")
            device = child.weight.device
            layer.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False,
                                             compress_statistics=config.bnb_4bit_use_double_quant,
                                             quant_type=config.bnb_4bit_quant_type,
                                             quant_storage=config.bnb_4bit_quant_storage, module=layer).to(device)
            if child.bias is not None:
                layer.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
            setattr(parent, name, layer)
            replaced += 1
    # what transformers' bitsandbytes quantizer marks, and PEFT and TRL read
    model.is_loaded_in_4bit = True
    model.quantization_method = "bitsandbytes"
    model.config.quantization_config = config
    return replaced


def load_base_model(cfg: DictConfig, runtime: Runtime):
    """Load the frozen backbone on `runtime.device`, quantized to NF4 when `runtime.quantization` says so.

    A `random_weights` backbone is built at random on the device instead of read from files.
    """
    from transformers import AutoModelForCausalLM

    from trainer.backbones import build_random_model, has_random_weights

    folder = backbone_folder(cfg)
    quantization = nf4_config(cfg, runtime) if runtime.quantization == "nf4" else None
    if has_random_weights(folder):
        model = build_random_model(folder, runtime.dtype, runtime.device)
        if quantization is not None:
            quantize_to_nf4(model, quantization)
    else:
        kwargs = dict(dtype=runtime.dtype, trust_remote_code=cfg.backbone.trust_remote_code, attn_implementation="sdpa")
        if quantization is not None:
            kwargs["quantization_config"] = quantization
            kwargs["device_map"] = {"": runtime.device if runtime.device == "cpu" else 0}
        model = AutoModelForCausalLM.from_pretrained(str(folder), **kwargs)
        if quantization is None:
            model.to(runtime.device)
    disable_cpu_weight_repacking(model)
    return model


class AcceleratorOptionError(RuntimeError):
    """A speed option this machine or install cannot honour; the message says what to change."""

    code = "unsupported_option"


def liger_patches(runtime: Runtime):
    """Liger's patching module, once it is clear this machine can run its kernels (CUDA, installed)."""
    if runtime.device != "cuda":
        raise AcceleratorOptionError("train.liger_kernel=true needs a CUDA GPU (Liger's kernels are written in "
                                     "Triton); set train.liger_kernel=false on this machine")
    try:
        from liger_kernel.transformers import monkey_patch
    except ImportError:
        raise AcceleratorOptionError("train.liger_kernel=true needs the liger-kernel package: "
                                     "pip install 'ftlab[gpu]' (or pip install liger-kernel)") from None
    return monkey_patch


def apply_liger_kernels(model, runtime: Runtime) -> None:
    """Swap Liger's Triton kernels in for the backbone's RMSNorm, RoPE and SwiGLU (CUDA only).

    Liger's losses stay off: ftlab computes the loss itself, with the LM head applied only
    where the next token is supervised.
    """
    patches = liger_patches(runtime)
    model_type = model.config.model_type
    if model_type not in patches.MODEL_TYPE_TO_APPLY_LIGER_FN:
        raise AcceleratorOptionError(f"Liger has no kernels for model type {model_type!r}; "
                                     "set train.liger_kernel=false for this backbone")
    patches._apply_liger_kernel_to_instance(model=model, cross_entropy=False, fused_linear_cross_entropy=False)


def compile_decoder_layers(model) -> int:
    """torch.compile each decoder layer in place (regional compilation: one graph serves every
    layer; 45 s on the embedded backbone on 2 CPU cores, against 392 s for the whole model).
    Returns the number of layers compiled."""
    layers = [module for module in model.modules() if type(module).__name__.endswith("DecoderLayer")]
    for layer in layers:
        layer.compile(dynamic=True)  # packed rows change length every step
    return len(layers)


def keep_hidden_states_fp32(model) -> None:
    """Make the embedding hand fp32 hidden states to the decoder, whatever the weights' dtype.

    The weights stay bf16/fp16 and autocast runs the matmuls in that precision, but the hidden
    states then stay fp32 through every residual add (and norm), so the small updates a young
    LoRA adapter makes are not rounded away. Upcasting the weights instead would add memory and
    no information. Measured on the embedded backbone: the held-out loss of an fp32 run at about
    the speed and memory of an all-bf16 one.
    """
    model.get_input_embeddings().register_forward_hook(lambda module, inputs, output: output.float())


# torch asks for an explicit choice; the non-reentrant variant needs no input that requires grad
CHECKPOINTING = {"use_reentrant": False}


def add_lora(model, cfg: DictConfig, runtime: Runtime):
    """Freeze the backbone and attach a fresh LoRA adapter.

    Quantized or not, the frozen weights keep their dtype (bf16 on a GPU) and only the hidden
    states are fp32 (`keep_hidden_states_fp32`). PEFT's `prepare_model_for_kbit_training` would
    upcast the embedding, the LM head and the norms to fp32 instead: 2 GB more on an 8B model
    for the same numbers, and a mix of dtypes that FSDP cannot shard.
    """
    from peft import LoraConfig, get_peft_model

    model.requires_grad_(False)
    if runtime.dtype != torch.float32 and cfg.train.fp32_hidden_states:
        keep_hidden_states_fp32(model)
    if cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=CHECKPOINTING)
    model.config.use_cache = False  # training forwards must not build a KV cache
    if cfg.get("init_adapter"):  # continue a fine-tuned model: its adapter (rank, targets, weights) trains on
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(cfg.init_adapter), is_trainable=True)
    else:
        lora = cfg.lora
        config = LoraConfig(
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=list(lora.target_modules or cfg.backbone.lora_target_modules),
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, config)
    if cfg.train.fused_lora and cfg.train.distributed != Distributed.fsdp:
        # FSDP makes each LoRA matrix a unit of its own, whole only inside its own forward: PEFT's forward calls
        # it, the fused one reads the weights directly
        from trainer.fused import fuse_lora_adds

        fuse_lora_adds(model)
    if runtime.dtype != torch.float32:
        let_autocast_cast_adapter_inputs(model)
    return model


def let_autocast_cast_adapter_inputs(model) -> int:
    """Run the LoRA matmuls in the frozen weights' dtype under autocast, on the layer's own input.

    PEFT keeps the adapter's weights in fp32 and, before each adapter, copies the bf16 input to
    fp32; autocast then copies it back to bf16 for the matmul and keeps that copy for backward:
    two casts per wrapped projection (7 per layer) and one saved copy of each projection's input.
    Training always runs under autocast in the runtime's dtype (and bitsandbytes' 4-bit layers
    already skip the cast there), so the first cast only costs time and memory. The weights and
    the optimizer stay fp32. Returns the number of adapter layers changed. Figures: README,
    Performance.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [module for module in model.modules() if isinstance(module, BaseTunerLayer)]
    for layer in layers:
        layer.cast_input_dtype_enabled = False
    return len(layers)


def load_for_inference(cfg: DictConfig, adapter_dir=None, runtime: Runtime | None = None):
    """Backbone (+ adapter from `adapter_dir`, if given) in eval mode, for chat, eval and export."""
    runtime = runtime or resolve_runtime(cfg.train)
    model = load_base_model(cfg, runtime).requires_grad_(False)  # nothing trains it: the engine packs frozen weights
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir))
    model.eval()
    return model
