"""Typed schemas for every config group, registered in Hydra's ConfigStore.

`conf/config.yaml` starts from `ftlab_schema`, so a misspelt key fails at composition with
its full name (``Key 'n_epoch' not in 'TrainConfig'``) and an enum field lists its choices.
Fields that take ``auto`` or a value (as the hosted API does) are checked when resolved, in
``trainer.hyperparams``, with the same kind of message.
"""
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


class DataFormat(Enum):
    chat = "chat"  # {"messages": [...]}: gpt-3.5-turbo
    prompt_completion = "prompt_completion"  # {"prompt", "completion"}: babbage-002, davinci-002
    preference = "preference"  # {"input", "preferred_output", "non_preferred_output"}: method=dpo on a chat family
    reinforcement = "reinforcement"  # {"messages": [..., user], <item fields>}: method=reinforcement, graded samples


class MethodType(Enum):
    supervised = "supervised"  # learn the assistant replies (SFT)
    dpo = "dpo"  # learn to prefer one reply over another (Direct Preference Optimization)
    reinforcement = "reinforcement"  # learn from a grader's rewards on sampled replies (GRPO)


class Quantization(Enum):
    none = "none"
    nf4 = "nf4"  # bitsandbytes 4-bit NF4, double quantization (QLoRA)
    auto = "auto"  # nf4 on a CUDA GPU, none on CPU


class Precision(Enum):
    auto = "auto"  # bf16 on a GPU that supports it, else fp32
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


class Distributed(Enum):
    ddp = "ddp"  # replicate the model on every rank (torchrun / accelerate launch)
    fsdp = "fsdp"  # shard it too: large backbones, with quantization=nf4 (FSDP + QLoRA)


class Device(Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


@dataclass
class ModelConfig:
    """The hosted model family a job stands in for."""

    name: str = MISSING  # gpt-3.5-turbo | babbage-002 | davinci-002
    format: DataFormat = DataFormat.chat
    context_length: int = 4096  # tokens per example; longer examples are truncated
    encoding: str = "cl100k_base"  # tiktoken encoding used for billing


@dataclass
class BackboneConfig:
    """The local weights that stand in for the model family."""

    name: str = MISSING
    load: Any = MISSING  # a _target_ node returning (model, tokenizer)
    n_params: float = 0.0  # parameters, for time/MFU estimates
    chat_template: Optional[str] = None  # overrides the tokenizer's template when set
    trust_remote_code: bool = False
    lora_target_modules: List[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )


@dataclass
class DataConfig:
    name: str = MISSING
    train_file: str = MISSING  # JSONL path; sample://<name> points into ftlab's bundled samples
    validation_file: Optional[str] = None
    task: Optional[str] = None  # which task metrics eval reports: json | terse | tone | null
    cache_tokenized: bool = True  # tokenize each file once (per tokenizer and max_length), kept in cache_dir/tokenized
    grader: Optional[str] = None  # method=reinforcement: the grader these files ship with (a JSON file, sample:// too)


@dataclass
class LoraConfig:
    r: int = 16  # higher: more capacity and memory
    alpha: int = 32  # scale = alpha / r
    dropout: float = 0.0  # each LoRA dropout copies its input: ~30% slower and ~250 MiB more on CPU
    target_modules: Optional[List[str]] = None  # null: the backbone's lora_target_modules


@dataclass
class DpoConfig:
    """method=dpo: the hosted API's `method.dpo.hyperparameters` (beta) and ftlab's own DPO knobs."""

    beta: Any = "auto"  # auto | float in (0, 2]: how far the policy may move from the reference (auto: 0.1)
    base_learning_rate: float = 2.0e-4  # DPO's learning rate at learning_rate_multiplier 1 (SFT's; README, Preference fine-tuning)
    rpo_alpha: Optional[float] = None  # weight of an NLL term on the preferred output (TRL's rpo_alpha); null: plain DPO
    shared_prompt: bool = True  # a pair's outputs in one row after one copy of the prompt; false: two sequences a pair


@dataclass
class ReinforcementConfig:
    """method=reinforcement: the hosted API's `method.reinforcement` (grader, hyperparameters) and ftlab's own knobs."""

    grader: Optional[str] = None  # a grader JSON file, or the grader as JSON text (as the API takes it); null: data.grader
    compute_multiplier: Any = "auto"  # auto (1.0) | float: samples per prompt = round(group_size × it), at least 2
    eval_interval: Any = "auto"  # auto | int: steps between validation scorings (auto: train.eval_every)
    eval_samples: Any = "auto"  # auto | int: validation prompts scored at each evaluation (auto: all, up to 64)
    reasoning_effort: str = "default"  # default | low | medium | high: scales the reply budget (README)
    group_size: int = 8  # samples per prompt at compute_multiplier 1 (GRPO's G)
    max_new_tokens: int = 64  # a sampled reply's budget at reasoning_effort medium/default
    temperature: float = 1.0  # sampling temperature of the training rollouts (validation is greedy)
    top_p: float = 1.0
    clip_epsilon: float = 0.2  # the clipped policy-gradient loss's ε
    kl_coef: float = 0.0  # weight of a KL term to the reference (the adapter disabled); 0: none, no reference pass
    base_learning_rate: float = 2.0e-4  # at learning_rate_multiplier 1 (README, Reinforcement fine-tuning)


@dataclass
class MethodConfig:
    """The fine-tuning method: what the recipe optimises (conf/method/)."""

    type: MethodType = MethodType.supervised
    data_format: Optional[DataFormat] = None  # the files' format; null: the model family's (chat or prompt_completion)
    objective: Any = MISSING  # a _target_ node (trainer.methods.*): the method's batches, loss and metrics
    dpo: DpoConfig = field(default_factory=DpoConfig)
    reinforcement: ReinforcementConfig = field(default_factory=ReinforcementConfig)


@dataclass
class TrainConfig:
    n_epochs: Any = "auto"  # auto | int (hosted rule: auto targets 3, bounded by dataset size)
    batch_size: Any = "auto"  # auto | int, examples per optimizer step
    learning_rate_multiplier: Any = "auto"  # auto | float, times base_learning_rate
    base_learning_rate: float = 2.0e-4
    seed: int = 42
    max_steps: Optional[int] = None  # stop after this many optimizer steps (null: all epochs)
    max_length: Optional[int] = None  # tokens per example; null: the model family's context_length
    quantization: Quantization = Quantization.auto
    precision: Precision = Precision.auto
    device: Device = Device.auto
    gradient_checkpointing: bool = False  # less activation memory, ~30% slower
    compile: bool = False  # torch.compile each decoder layer (regional); measured slower on CPU, meant for GPUs
    liger_kernel: bool = False  # Liger's Triton RMSNorm/RoPE/SwiGLU kernels (CUDA only; pip install 'ftlab[gpu]')
    fused_lora: bool = True  # the adapter's product added inside the projection's matmul; false: PEFT's own forward
    fused_rms_norm: bool = True  # torch's fused rms_norm for Llama/Mistral/Qwen norms; false: transformers' own
    fp32_hidden_states: bool = False  # residual stream in fp32 under bf16/fp16 weights; measured no better in bf16, 40% slower on GPU
    micro_batch_size: Optional[int] = None  # rows per forward (gradient accumulation): examples, or packed rows; DPO: pairs
    packing: bool = True  # each batch's examples end to end in rows of up to max_length tokens, block-diagonal mask
    max_grad_norm: float = 1.0
    eval_every: int = 10  # optimizer steps between validation passes
    checkpoint_every: int = 50  # optimizer steps between checkpoints
    keep_checkpoints: int = 2  # newest checkpoints kept
    max_cost_usd: Optional[float] = None  # refuse a job whose hosted-price estimate is higher
    distributed: Distributed = Distributed.ddp  # how several launched processes share the work
    max_nonfinite_steps: int = 3  # NaN/inf losses or gradients in a row before the job fails (each is skipped)


@dataclass
class PriceRow:
    training: Optional[float] = MISSING  # USD per 1K training tokens (null for a family billed by the hour)
    training_per_hour: Optional[float] = None  # USD per hour of training (reinforcement fine-tuning's hosted rule)
    input: float = MISSING  # USD per 1K input tokens, fine-tuned model
    output: float = MISSING  # USD per 1K output tokens, fine-tuned model
    base_input: Optional[float] = None  # USD per 1K input tokens, base model
    base_output: Optional[float] = None


@dataclass
class PricingConfig:
    name: str = MISSING
    models: Dict[str, PriceRow] = field(default_factory=dict)
    gpu_hour_usd: float = 2.0  # what an hour of the local accelerator costs you
    cpu_hour_usd: float = 0.1
    local_tokens_per_second: Optional[float] = None  # measured training throughput; null: from backbone.n_params and trainer.cost.DEVICE_FLOPS


@dataclass
class GenerationConfig:
    """How chat and complete sample replies (eval always decodes greedily)."""

    temperature: float = 0.0  # 0: greedy, deterministic; the hosted API's default is 1
    top_p: float = 1.0  # nucleus sampling; used only when temperature > 0
    max_new_tokens: int = 256  # reply length cap, in backbone tokens
    stop: List[str] = field(default_factory=list)  # stop strings, as the hosted API's `stop` (end-of-turn always stops)
    seed: Optional[int] = None  # sampling seed; null: a fresh one each run
    prompt_suffix: Optional[str] = None  # complete: appended to each prompt; null: the training prompts' common separator (e.g. "\n\n###\n\n")


@dataclass
class EvalConfig:
    """`ftlab eval`: base backbone vs fine-tuned model on the validation file."""

    max_examples: int = 24  # examples generated per model (loss and accuracy use the whole file); generation is the slow part on CPU
    max_new_tokens: int = 96  # per reply; enough for the bundled samples' answers
    batch_size: int = 8  # examples per forward of the validation loss
    max_batch_size: int = 128  # replies the decoding engine generates together (every model's and prompt style's)
    compare_prompts: bool = True  # also score base + long instructions vs fine-tuned with no system prompt (chat only)
    instructions: Dict[str, str] = field(default_factory=dict)  # the long instruction prompt per data.task, for compare_prompts
    signoff: str = "— The Brightbean crew ☕"  # tone task: the sign-off a reply must end with
    max_words: int = 6  # terse task: a reply counts as terse at this many words or fewer
    plot: bool = True  # write eval.png (before/after bar chart)


@dataclass
class ExportConfig:
    """`ftlab export`: merge the adapter into a full model in `<run dir>/merged/`."""

    dtype: str = "auto"  # auto (fp32, exact merge) | fp32 | bf16 | fp16 (halves the size; verify then allows 5e-2)
    verify: bool = True  # reload the merged model and compare its logits with backbone + adapter
    atol: float = 1.0e-3  # allowed max |logit difference| when verifying (fp32 rounding is ~1e-4 on SmolLM2)


@dataclass
class ServerConfig:
    """`ftlab serve`: the hosted fine-tuning API (files, jobs, models, chat) on this machine."""

    host: str = "127.0.0.1"  # loopback; any other address needs an api_key
    port: int = 8000
    api_key: Optional[str] = None  # clients send it as the Bearer token; null: $FTLAB_API_KEY, else no key (loopback only)
    # Host names the server answers to besides loopback (localhost, 127.0.0.1, [::1]); any other Host header
    # is refused, against DNS rebinding. With an api_key and this list empty, any Host is answered.
    allowed_hosts: List[str] = field(default_factory=list)
    max_running_jobs: int = 1  # jobs training at once; the rest wait in a FIFO queue
    max_loaded_models: int = 4  # adapters kept loaded on the backbone (least recently used ones are unloaded)
    max_batch_size: int = 32  # requests' choices decoded together in one batch (more: throughput; fewer: latency)
    max_queue: int = 256  # requests waiting for a place in the batch; beyond it, 429 with Retry-After
    max_upload_mb: int = 512  # largest file accepted by POST /v1/files
    max_request_kb: int = 1024  # largest JSON request body
    max_job_restarts: int = 3  # a job whose process dies is resumed from its newest checkpoint this many times


@dataclass
class GradersConfig:
    """Graders (`ftlab grade`, the graders API, reinforcement fine-tuning): what a python grader's process may
    use, and the model behind `cosine` similarity."""

    python_timeout_s: float = 30.0  # a python grader's call that takes longer scores 0 (python_grader_server_error)
    python_memory_mb: int = 2048  # its process's memory limit (the hosted sandbox's: 2 GB)
    python_disk_mb: int = 1024  # the largest file it may write (the hosted sandbox's: 1 GB)
    embedding_model: Optional[str] = None  # a local folder (transformers) for text_similarity cosine; null: refused


@dataclass
class FtlabConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    pricing: PricingConfig = field(default_factory=PricingConfig)
    optim: Any = None  # a _partial_ _target_ node (conf/optim/): called with the LoRA parameters and lr
    scheduler: Any = None  # a _partial_ _target_ node (conf/scheduler/): called with the optimizer and total steps
    logger: Any = None  # a _target_ node: trainer.loggers.WandbLogger | trainer.loggers.NullLogger
    moderation: Any = None  # a _target_ node: the content screen run by validate
    init_adapter: Optional[str] = None  # train: start from this adapter folder instead of a fresh LoRA (the API's model=ft:…)
    resume: Optional[str] = None  # train: a run dir or job id to continue from its newest complete checkpoint
    request: Optional[str] = None  # train: a job's request record (request.json, written by ftlab serve), taken as data
    org: str = "personal"  # the <org> part of ft:<model>:<org>:<suffix>:<id>
    suffix: Optional[str] = None  # the <suffix> part: up to 64 letters, digits, '-', '_', '.'
    cache_dir: str = "~/.cache/ftlab"  # converted backbones, tokenized data
    # Using a finished job (chat, complete, eval, export):
    job: Optional[str] = None  # a job id (ftjob-…), an ft: model name, a run dir, `latest`, or `base` (the backbone alone)
    jobs_root: Optional[str] = None  # where job ids are looked up; null: $FTLAB_OUTPUTS or ./outputs
    adapter: bool = True  # false: the job's backbone and chat template without its adapter (the "before" model)
    prompt: Optional[str] = None  # chat/complete: answer this one prompt and exit; null: interactive
    system: Optional[str] = None  # chat: a system message sent before the conversation
    grader: Optional[str] = None  # grade: a grader JSON file (as the hosted API takes it)
    samples: Optional[str] = None  # grade: a JSONL file of {"sample": <reply>, "item": {<fields>}}
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    # Serving (ftlab serve):
    server: ServerConfig = field(default_factory=ServerConfig)
    graders: GradersConfig = field(default_factory=GradersConfig)
    executor: Any = None  # a _target_ node (conf/executor/): where the server's jobs run (local processes | Slurm)


def register_configs() -> None:
    """Register the schema so that conf/config.yaml can start from it."""
    ConfigStore.instance().store(name="ftlab_schema", node=FtlabConfig)
