"""`ftlab export job=...`: merge the LoRA adapter into the backbone, as one standalone model.

Writes `<run dir>/merged/`: safetensors weights and config, the job's tokenizer with its chat
template, a `generation_config.json` that stops at the template's end-of-turn token and
samples as `generation.*` says, and `ftlab_export.json` (where it came from, the logit check).
Load it with `AutoModelForCausalLM.from_pretrained(<run dir>/merged)` or serve it with
`vllm serve <run dir>/merged`. The adapter in `adapter/` stays as it was (loadable by peft).

The backbone is loaded unquantized for merging, even for a QLoRA job, so the merged weights
are the full-precision base plus the LoRA update. The merge is written to a staging folder
and renamed into place; with `export.verify` the saved model is loaded back and its logits
compared with backbone + adapter on a probe prompt.
"""
import shutil
import tempfile
import time
from pathlib import Path

import torch
from omegaconf import DictConfig
from rich.console import Console

from trainer.inference import (
    encode_chat_prompt,
    encode_completion_prompt,
    end_of_turn_ids,
    load_job_tokenizer,
    open_job,
)
from trainer.files import write_json
from trainer.jobs import JobNotFound, JobRef, require_adapter
from trainer.schema import DataFormat

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PROBE = [{"role": "user", "content": "Hugo Alvarez | Maple Ridge Dental | Porto"}]


class ExportError(RuntimeError):
    """The merged model does not reproduce backbone + adapter."""


def _probe_ids(cfg: DictConfig, tokenizer) -> torch.Tensor:
    if cfg.model.format == DataFormat.chat:
        ids = encode_chat_prompt(tokenizer, PROBE)
    else:
        ids = encode_completion_prompt(tokenizer, PROBE[0]["content"])
    return torch.tensor([ids])


def _merge_runtime(cfg: DictConfig):
    """CPU or GPU as configured, never quantized: merging needs the full-precision weights."""
    from trainer.model import Runtime, resolve_runtime

    runtime = resolve_runtime(cfg.train)
    dtype = torch.float32 if cfg.export.dtype == "auto" else DTYPES[cfg.export.dtype]
    return Runtime(device=runtime.device, dtype=dtype, quantization="none")


def generation_config_for(cfg: DictConfig, tokenizer, model_config):
    """A GenerationConfig that stops where training taught the model to stop, sampling as `generation.*`."""
    from transformers import GenerationConfig

    gen = cfg.generation
    stop_ids = end_of_turn_ids(tokenizer, cfg.model.format == DataFormat.chat)
    kwargs = dict(eos_token_id=stop_ids if len(stop_ids) > 1 else stop_ids[0],
                  pad_token_id=tokenizer.pad_token_id, bos_token_id=getattr(model_config, "bos_token_id", None),
                  max_new_tokens=int(gen.max_new_tokens))
    if gen.temperature and gen.temperature > 0:
        kwargs |= dict(do_sample=True, temperature=float(gen.temperature), top_p=float(gen.top_p))
    return GenerationConfig(**kwargs)


@torch.no_grad()
def export_merged(cfg: DictConfig, job: JobRef, console: Console | None = None) -> dict:
    """Merge `job`'s adapter into its backbone and write `<run dir>/merged/`; returns the export record."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from trainer.model import load_base_model

    console = console or Console(stderr=True, soft_wrap=True)
    require_adapter(job)
    runtime = _merge_runtime(cfg)
    tokenizer = load_job_tokenizer(cfg, job)
    model = PeftModel.from_pretrained(load_base_model(cfg, runtime), str(job.adapter_dir))
    model.eval()
    probe = _probe_ids(cfg, tokenizer).to(runtime.device)
    reference = model(input_ids=probe).logits.float()
    merged = model.merge_and_unload()
    merged.generation_config = generation_config_for(cfg, tokenizer, merged.config)

    target = job.run_dir / "merged"
    staging = Path(tempfile.mkdtemp(dir=job.run_dir, prefix=".merged-"))
    try:
        merged.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        record = {
            "object": "ftlab.export",
            "job": job.id,
            "fine_tuned_model": job.name,
            "backbone": cfg.backbone.name,
            "adapter": str(job.adapter_dir),
            "dtype": str(runtime.dtype).removeprefix("torch."),
            "created_at": int(time.time()),
            "max_abs_logit_diff": None,
        }
        if cfg.export.verify:
            reloaded = AutoModelForCausalLM.from_pretrained(str(staging), dtype=runtime.dtype).to(runtime.device)
            reloaded.eval()
            diff = (reloaded(input_ids=probe).logits.float() - reference).abs().max().item()
            record["max_abs_logit_diff"] = diff
            atol = float(cfg.export.atol) if runtime.dtype == torch.float32 else max(float(cfg.export.atol), 5e-2)
            if not diff <= atol:
                raise ExportError(f"merged model's logits differ from backbone + adapter by {diff:.2e} "
                                  f"(> export.atol={atol:g}); nothing was written to {target}")
        write_json(staging / "ftlab_export.json", record)
        if target.exists():
            old = Path(tempfile.mkdtemp(dir=job.run_dir, prefix=".merged-old-"))
            target.rename(old / "merged")
            shutil.rmtree(old, ignore_errors=True)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    record["path"] = str(target)
    return record


def export_main(cfg: DictConfig, overrides: tuple[str, ...] = ()) -> int:
    """`ftlab export`: write `<run dir>/merged/` for the job."""
    console = Console(soft_wrap=True)
    try:
        job_cfg, job = open_job(cfg, overrides)
        if job is None:
            raise JobNotFound("ftlab export merges a job's adapter: pass job=<ftjob-… | ft:… | run dir | latest>")
        record = export_merged(job_cfg, job, Console(stderr=True, soft_wrap=True))
    except (JobNotFound, ExportError) as error:
        Console(stderr=True, soft_wrap=True).print(f"[red]error[/] {error}", highlight=False)
        return 2
    check = (f"; max |logit diff| vs backbone + adapter = {record['max_abs_logit_diff']:.1e}"
             if record["max_abs_logit_diff"] is not None else "")
    console.print(f"merged {record['fine_tuned_model']} into {record['path']} ({record['dtype']}{check})\n"
                  f"  transformers: AutoModelForCausalLM.from_pretrained({record['path']!r})\n"
                  f"  vLLM:         vllm serve {record['path']}", highlight=False)
    return 0
