"""export: the merged model reproduces backbone + adapter, is a plain transformers model with the
job's tokenizer and chat template, is written atomically, and leaves the adapter loadable by peft."""
import json

import pytest
import torch

from tests.test_chat import tiny_chat_job, use_cfg  # noqa: F401 - the fixture
from trainer.inference import open_job
from trainer.export import export_main, export_merged


@pytest.fixture(scope="module")
def merged(tiny_chat_job, cache_dir):  # noqa: F811
    cfg, job = open_job(use_cfg(cache_dir, tiny_chat_job))
    # make the adapter matter: a trained-for-2-steps LoRA update is tiny, so scale lora_B up
    from safetensors.torch import load_file, save_file

    path = job.adapter_dir / "adapter_model.safetensors"
    weights = {k: (v * 200 if "lora_B" in k else v) for k, v in load_file(path).items()}
    save_file(weights, path)
    return cfg, job, export_merged(cfg, job)


def test_merged_logits_match_backbone_plus_adapter(merged):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from trainer.model import Runtime, load_base_model

    cfg, job, record = merged
    runtime = Runtime(device="cpu", dtype=torch.float32, quantization="none")
    with_adapter = PeftModel.from_pretrained(load_base_model(cfg, runtime), str(job.adapter_dir)).eval()
    plain = AutoModelForCausalLM.from_pretrained(str(job.run_dir / "merged")).eval()
    batch = torch.randint(3, plain.config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = with_adapter(input_ids=batch).logits
        got = plain(input_ids=batch).logits
        with with_adapter.disable_adapter():
            base = with_adapter(input_ids=batch).logits
    assert (got - base).abs().max() > 1e-3, "the adapter changes nothing; the test would prove nothing"
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    assert record["max_abs_logit_diff"] < 1e-4


def test_merged_folder_is_complete_and_the_adapter_still_loads(merged):
    from peft import PeftConfig
    from transformers import AutoTokenizer

    cfg, job, _ = merged
    folder = job.run_dir / "merged"
    for name in ["config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                 "chat_template.jinja", "ftlab_export.json"]:
        assert (folder / name).is_file(), name
    assert not list(job.run_dir.glob(".merged-*")), "staging folders left behind"
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    messages = [{"role": "user", "content": "hi"}]
    saved = AutoTokenizer.from_pretrained(str(job.run_dir / "adapter"))
    assert tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        saved.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    generation = json.loads((folder / "generation_config.json").read_text())
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end in (generation["eos_token_id"] if isinstance(generation["eos_token_id"], list)
                      else [generation["eos_token_id"]])
    assert PeftConfig.from_pretrained(str(job.adapter_dir)).peft_type.value == "LORA"
    assert json.loads((folder / "ftlab_export.json").read_text())["job"] == job.id


def test_export_cli_replaces_a_previous_export(merged, tiny_chat_job, cache_dir, capsys):  # noqa: F811
    _, job, _ = merged
    before = (job.run_dir / "merged" / "ftlab_export.json").stat().st_mtime_ns
    assert export_main(use_cfg(cache_dir, tiny_chat_job, "export.verify=false")) == 0
    assert "vllm serve" in capsys.readouterr().out
    assert (job.run_dir / "merged" / "ftlab_export.json").stat().st_mtime_ns != before
    assert sorted(p.name for p in job.run_dir.iterdir() if p.name.startswith(".merged")) == []
