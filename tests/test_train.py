"""The training stage on the tiny Llama: a complete run directory, behaviour of the adapter,
determinism, failure and cancellation recorded in the job."""
import csv
import json
import signal
import sys
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import saved_adapter, write_jsonl
from trainer.jobs import JobRef, list_checkpoints
from trainer.run import RESULT_COLUMNS
from trainer.train import FineTuningJob, run_training


def read_results(run_dir: Path) -> list[dict]:
    with open(run_dir / "results.csv") as handle:
        return list(csv.DictReader(handle))


def train_cfg(make_cfg, chat_files, *overrides):
    train, valid = chat_files
    return make_cfg("data=custom", f"data.train_file={train}", f"data.validation_file={valid}", "train.n_epochs=1",
                    "train.batch_size=4", "train.eval_every=2", "train.checkpoint_every=2", *overrides)


def test_a_run_leaves_a_complete_job_record(make_cfg, chat_files, tmp_path):
    run_dir = tmp_path / "run"
    assert run_training(train_cfg(make_cfg, chat_files), run_dir) == 0
    for name in ["job.json", "events.jsonl", "results.csv", "estimate.json", "env.json", "loss.png",
                 "adapter/adapter_config.json", "adapter/adapter_model.safetensors", "validation.json"]:
        assert (run_dir / name).exists(), name
    job = json.loads((run_dir / "job.json").read_text())
    assert job["object"] == "fine_tuning.job" and job["id"].startswith("ftjob-") and len(job["id"]) == 30
    assert job["status"] == "succeeded" and job["error"] is None and job["finished_at"] >= job["created_at"]
    assert job["fine_tuned_model"] == f"ft:gpt-3.5-turbo:personal::{job['id'][6:14]}"
    assert job["hyperparameters"] == {"n_epochs": 1, "batch_size": 4, "learning_rate_multiplier": 1.0,
                                      "learning_rate": 2e-4}
    assert job["trained_tokens"] > 0 and len(job["training_file"]["sha256"]) == 64
    rows = read_results(run_dir)
    assert list(rows[0].keys()) == RESULT_COLUMNS
    assert [int(r["step"]) for r in rows] == [1, 2, 3]
    assert rows[-1]["valid_loss"] and rows[-1]["valid_mean_token_accuracy"]  # evaluated at the last step
    # a resume checkpoint every train.checkpoint_every steps; the epoch's own checkpoint is the one published
    assert [p.name for p in sorted((run_dir / "checkpoints").iterdir())] == ["step-000002", "step-000003"]
    assert [c["step_number"] for c in list_checkpoints(JobRef(job, run_dir, run_dir / "adapter"))] == [3]
    estimate = json.loads((run_dir / "estimate.json").read_text())
    assert job["trained_tokens"] == estimate["billed_tokens"] and job["backbone_tokens"] > 0  # billed, as hosted
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    assert {"level", "message", "type", "data"} <= events[0].keys()
    assert sum(e["type"] == "metrics" for e in events) == 3
    assert not list(run_dir.glob(".*tmp*")), "temp files left behind"
    env = json.loads((run_dir / "env.json").read_text())
    assert env["seed"] == 42 and env["packages"]["torch"] and env["data"]["training_file"]["sha256"]


def test_epoch_checkpoints_keep_the_last_three_epochs_and_a_cut_job_bills_what_it_trained(make_cfg, chat_files,
                                                                                          tmp_path):
    def published(run_dir):
        return [c["step_number"] for c in list_checkpoints(JobRef({"id": "ftjob-x"}, run_dir, run_dir / "adapter"))]

    full, cut = tmp_path / "full", tmp_path / "cut"
    assert run_training(train_cfg(make_cfg, chat_files, "train.n_epochs=4", "train.checkpoint_every=1000"), full) == 0
    assert published(full) == [12, 9, 6]  # 3 steps an epoch: the checkpoints of the last three epochs, newest first
    assert sorted(p.name for p in (full / "checkpoints").iterdir()) == ["step-000006", "step-000009", "step-000012"]
    billed = json.loads((full / "estimate.json").read_text())["billed_tokens"]
    assert json.loads((full / "job.json").read_text())["trained_tokens"] == billed
    assert run_training(train_cfg(make_cfg, chat_files, "train.n_epochs=4", "train.max_steps=5"), cut) == 0
    assert published(cut) == [5, 3]  # the last step ends the (partial) second epoch
    assert json.loads((cut / "job.json").read_text())["trained_tokens"] == round(billed * 5 / 12)


def test_training_moves_every_adapter_weight_and_no_base_weight(make_cfg, chat_files, tmp_path):
    cfg = train_cfg(make_cfg, chat_files, "train.max_steps=2")
    job = FineTuningJob(cfg, tmp_path / "run")
    job.setup()
    assert job.model.config._attn_implementation == "ftlab_packed_rows"  # packed rows on a CPU
    before = {k: v.detach().clone() for k, v in job.model.named_parameters()}
    job.train()
    after = dict(job.model.named_parameters())
    lora = [k for k in before if "lora_" in k]
    assert lora and all(not torch.equal(before[k], after[k]) for k in lora if "lora_A" in k or "lora_B" in k)
    assert all(torch.equal(before[k], after[k]) for k in before if "lora_" not in k)


def test_same_seed_same_losses_other_seed_other_losses(make_cfg, chat_files, tmp_path):
    losses = []
    for name, seed, cache in [("a", 7, "false"), ("b", 7, "true"), ("c", 8, "true")]:
        cfg = train_cfg(make_cfg, chat_files, f"train.seed={seed}", f"data.cache_tokenized={cache}")
        assert run_training(cfg, tmp_path / name) == 0
        losses.append([float(r["train_loss"]) for r in read_results(tmp_path / name)])
    assert losses[0] == losses[1]  # also: data read back from the tokenization cache trains the same
    assert losses[0] != losses[2]
    events = (tmp_path / "c" / "events.jsonl").read_text()
    assert "train.jsonl: read from the tokenization cache" in events  # b tokenized it; c did not need to


@pytest.mark.parametrize("native_bf16,expected", [(True, torch.bfloat16), (False, torch.float32)])
def test_auto_precision_is_bf16_only_on_a_cpu_that_computes_it(make_cfg, monkeypatch, native_bf16, expected):
    import trainer.model

    monkeypatch.setattr(trainer.model, "cpu_has_native_bf16", lambda: native_bf16)
    assert trainer.model.resolve_runtime(make_cfg("train.precision=auto").train).dtype == expected
    assert trainer.model.resolve_runtime(make_cfg("train.precision=fp32").train).dtype == torch.float32


@pytest.mark.parametrize("fp32_hidden_states,hidden_dtype", [("true", torch.float32), ("false", torch.bfloat16)])
def test_bf16_run_keeps_fp32_adapter_and_optimizer_and_learns(make_cfg, chat_files, tmp_path, fp32_hidden_states,
                                                              hidden_dtype):
    cfg = train_cfg(make_cfg, chat_files, "train.precision=bf16", "train.n_epochs=3", "train.eval_every=100",
                    f"train.fp32_hidden_states={fp32_hidden_states}")
    job = FineTuningJob(cfg, tmp_path / "run")
    job.setup()
    base = [p for n, p in job.model.named_parameters() if "lora_" not in n and p.dim() == 2]
    adapter = [p for n, p in job.model.named_parameters() if "lora_" in n]
    assert {p.dtype for p in base} == {torch.bfloat16} and {p.dtype for p in adapter} == {torch.float32}
    seen = []  # the residual stream's dtype between decoder layers
    for layer in [m for m in job.model.modules() if type(m).__name__ == "LlamaDecoderLayer"]:
        layer.register_forward_hook(lambda module, args, output: seen.append((args[0].dtype, output.dtype)))
    job.train()
    assert seen and set(seen) == {(hidden_dtype, hidden_dtype)}
    assert all(state["exp_avg"].dtype == torch.float32 for state in job.optimizer.state.values())
    losses = [row["train_loss"] for row in job.results.rows]
    assert sum(losses[-3:]) < sum(losses[:3])


def test_prompt_completion_job(make_cfg, tmp_path):
    rows = [{"prompt": f"Ticket {i}: my card was charged twice\n\n###\n\n", "completion": " billing\n"} for i in range(10)]
    train = write_jsonl(tmp_path / "pc.jsonl", rows)
    cfg = make_cfg("model=babbage-002", "data=custom", f"data.train_file={train}", "train.max_steps=2")
    assert run_training(cfg, tmp_path / "run") == 0
    job = json.loads((tmp_path / "run" / "job.json").read_text())
    assert job["model"] == "babbage-002" and job["fine_tuned_model"].startswith("ft:babbage-002:")


def test_invalid_file_fails_before_loading_a_model(make_cfg, tmp_path):
    train = write_jsonl(tmp_path / "bad.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}] * 12)
    cfg = make_cfg("data=custom", f"data.train_file={train}")
    assert run_training(cfg, tmp_path / "run") == 1
    job = json.loads((tmp_path / "run" / "job.json").read_text())
    assert job["status"] == "failed"
    assert job["error"]["code"] == "example_missing_assistant_message"
    assert "bad.jsonl:1" in job["error"]["message"]
    assert not (tmp_path / "run" / "adapter").exists()


def test_missing_file_fails_with_its_name(make_cfg, tmp_path):
    cfg = make_cfg("data=custom", f"data.train_file={tmp_path / 'nope.jsonl'}")
    assert run_training(cfg, tmp_path / "run") == 1


def test_sigterm_cancels_and_keeps_a_checkpoint(make_cfg, chat_files, tmp_path, monkeypatch):
    cfg = train_cfg(make_cfg, chat_files, "train.n_epochs=50", "train.checkpoint_every=1000")
    original = FineTuningJob._optimizer_step
    calls = []

    def step_then_signal(self, batch):
        calls.append(1)
        if len(calls) == 3:
            signal.raise_signal(signal.SIGTERM)
        return original(self, batch)

    monkeypatch.setattr(FineTuningJob, "_optimizer_step", step_then_signal)
    assert threading.current_thread() is threading.main_thread()
    run_dir = tmp_path / "run"
    assert run_training(cfg, run_dir) == 130
    job = json.loads((run_dir / "job.json").read_text())
    assert job["status"] == "cancelled" and job["finished_at"]
    checkpoints = list((run_dir / "checkpoints").glob("step-*"))
    assert len(checkpoints) == 1 and (checkpoints[0] / "adapter" / "adapter_model.safetensors").exists()
    assert load_file(checkpoints[0] / "adapter" / "adapter_model.safetensors")


@pytest.mark.parametrize("key,value", [("train.batch_size", "0"), ("train.learning_rate_multiplier", "fast"),
                                       ("train.n_epochs", "-1")])
def test_bad_hyperparameter_values_name_the_key(make_cfg, chat_files, tmp_path, key, value):
    cfg = train_cfg(make_cfg, chat_files, f"{key}={value}")
    assert run_training(cfg, tmp_path / "run") == 1
    error = json.loads((tmp_path / "run" / "job.json").read_text())["error"]
    assert key in error["message"]


def test_liger_kernels_on_cpu_fail_before_loading_anything(make_cfg, chat_files, tmp_path, monkeypatch):
    import trainer.train

    monkeypatch.setattr(trainer.train, "load_tokenizer", lambda cfg: pytest.fail("tokenizer loaded"))
    assert run_training(train_cfg(make_cfg, chat_files, "train.liger_kernel=true"), tmp_path / "run") == 1
    job = json.loads((tmp_path / "run" / "job.json").read_text())
    assert job["status"] == "failed" and job["error"]["code"] == "unsupported_option"
    assert "needs a CUDA GPU" in job["error"]["message"] and "train.liger_kernel=false" in job["error"]["message"]


def test_liger_keeps_ftlabs_own_loss(make_cfg, monkeypatch):
    """Liger's fused loss would bypass the LM head on supervised positions only; it must stay off."""
    import types

    from trainer.model import Runtime, apply_liger_kernels

    calls = []
    fake = types.SimpleNamespace(MODEL_TYPE_TO_APPLY_LIGER_FN={"llama": None},
                                 _apply_liger_kernel_to_instance=lambda **kwargs: calls.append(kwargs))
    monkeypatch.setitem(sys.modules, "liger_kernel", types.ModuleType("liger_kernel"))
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", types.SimpleNamespace(monkey_patch=fake))
    gpu = Runtime(device="cuda", dtype=torch.bfloat16, quantization="none")
    model = types.SimpleNamespace(config=types.SimpleNamespace(model_type="llama"))
    apply_liger_kernels(model, gpu)
    assert calls == [{"model": model, "cross_entropy": False, "fused_linear_cross_entropy": False}]
    model.config.model_type = "gpt2"
    with pytest.raises(RuntimeError, match="no kernels for model type 'gpt2'"):
        apply_liger_kernels(model, gpu)


def test_compiled_layers_train_like_eager_ones(make_cfg, chat_files, tmp_path):
    losses = {}
    for compiled in ["false", "true"]:
        cfg = train_cfg(make_cfg, chat_files, "train.max_steps=2", "lora.dropout=0", f"train.compile={compiled}")
        job = FineTuningJob(cfg, tmp_path / compiled)
        job.setup()
        layers = [m for m in job.model.modules() if type(m).__name__ == "LlamaDecoderLayer"]
        assert len(layers) == 2 and all((m._compiled_call_impl is not None) == (compiled == "true") for m in layers)
        job.train()
        losses[compiled] = [row["train_loss"] for row in job.results.rows]
    assert losses["true"] == pytest.approx(losses["false"], rel=1e-3)


def test_micro_batches_split_packed_rows_and_train_the_same(make_cfg, chat_files, tmp_path, monkeypatch):
    import trainer.methods.supervised

    rows_per_forward = []
    forward = trainer.methods.supervised.supervised_forward  # the supervised method's forward, which the loop calls
    monkeypatch.setattr(trainer.methods.supervised, "supervised_forward",
                        lambda model, batch: rows_per_forward.append(batch["input_ids"].size(0)) or forward(model, batch))
    losses, rows = {}, {}
    for micro in ["null", "1"]:
        rows_per_forward.clear()
        cfg = train_cfg(make_cfg, chat_files, "train.max_steps=2", "lora.dropout=0", "train.packing=true",
                        "train.max_length=64", f"train.micro_batch_size={micro}", "data.validation_file=null")
        assert run_training(cfg, tmp_path / micro) == 0
        losses[micro], rows[micro] = [float(r["train_loss"]) for r in read_results(tmp_path / micro)], list(rows_per_forward)
    assert min(rows["null"]) > 1 and set(rows["1"]) == {1}  # packed rows of <= 64 tokens, split one by one
    assert losses["1"] == pytest.approx(losses["null"], rel=1e-5)


def test_cpu_memory_settings_leave_a_users_choice_alone(monkeypatch):
    import os
    import platform

    from trainer.model import keep_cpu_memory_flat

    monkeypatch.setenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "7")
    assert keep_cpu_memory_flat() is (platform.libc_ver()[0] == "glibc")
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "7"
    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY")
    keep_cpu_memory_flat()
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "128"


def test_init_adapter_continues_from_a_saved_adapter(make_cfg, tmp_path):
    """model=ft:… on the API: the new job's LoRA starts as the parent's adapter, trainable."""
    from trainer.model import add_lora, load_base_model, resolve_runtime

    cfg = make_cfg()
    runtime = resolve_runtime(cfg.train)
    parent = saved_adapter(cfg, tmp_path / "adapter")
    child = add_lora(load_base_model(cfg, runtime), make_cfg(f"init_adapter={tmp_path / 'adapter'}"), runtime)
    expected = {n: p for n, p in parent.named_parameters() if "lora_" in n}
    got = {n: p for n, p in child.named_parameters() if "lora_" in n}
    assert expected.keys() == got.keys() and all(p.requires_grad for p in got.values())
    assert all(torch.equal(expected[n], got[n]) for n in expected)


@pytest.mark.parametrize("quantization, hidden", [("none", ["scipy", "bitsandbytes", "triton"]), ("nf4", ["scipy"])])
def test_a_job_skips_the_imports_it_never_uses(quantization, hidden):
    import subprocess
    import sys

    script = (f"import sys, torch\nfrom trainer.model import Runtime, skip_unused_imports\n"
              f"names = skip_unused_imports(Runtime('cpu', torch.bfloat16, {quantization!r}))\n"
              "import peft, transformers.models.llama.modeling_llama\n"
              "from peft import LoraConfig\n"
              "print(names, [name for name in names if name in sys.modules and sys.modules[name] is None])\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith(f"{hidden} {hidden}")  # still hidden after the imports
