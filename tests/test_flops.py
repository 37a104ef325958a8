"""MFU: the FLOP model, the GPU table, the CPU peak measured once and cached, and MFU in the job record."""
import json

import pytest
import torch

import trainer.flops
from trainer.flops import cpu_peak_flops, flops_per_token, gpu_peak_flops


def test_flop_model_and_gpu_table():
    assert flops_per_token(8e9) == 32e9  # 2N forward + 2N backward through the activations
    assert gpu_peak_flops("NVIDIA H100 80GB HBM3") == gpu_peak_flops("NVIDIA H200") == 989e12
    assert gpu_peak_flops("Some Future Card") is None


def test_cpu_peak_is_measured_once_and_cached(tmp_path, monkeypatch):
    measured = []
    monkeypatch.setattr(trainer.flops, "measure_cpu_peak_flops", lambda dtype: measured.append(dtype) or 5e10)
    assert cpu_peak_flops(torch.bfloat16, tmp_path) == cpu_peak_flops(torch.bfloat16, tmp_path) == 5e10
    assert measured == [torch.bfloat16]
    cpu_peak_flops(torch.float32, tmp_path)
    assert measured == [torch.bfloat16, torch.float32]  # one entry per dtype
    assert len(json.loads((tmp_path / "cpu_peak_flops.json").read_text())) == 2


def test_a_real_measurement_is_plausible():
    assert 1e8 < trainer.flops.measure_cpu_peak_flops(torch.float32, size=256, seconds=0.05) < 1e14


def test_training_reports_mfu_beside_tokens_per_second(make_cfg, chat_files, tmp_path, monkeypatch):
    import trainer.train
    from trainer.train import run_training

    monkeypatch.setattr(trainer.train, "peak_flops", lambda device, dtype, cache_dir: 1e9)
    train, valid = chat_files
    cfg = make_cfg("data=custom", f"data.train_file={train}", "train.max_steps=2", "train.batch_size=4")
    assert run_training(cfg, tmp_path / "run") == 0
    metrics = [json.loads(line)["data"] for line in (tmp_path / "run" / "events.jsonl").read_text().splitlines()
               if json.loads(line)["type"] == "metrics"]
    assert len(metrics) == 2
    for data in metrics:
        expected = data["tokens_per_second"] * 4 * cfg.backbone.n_params / 1e9
        assert data["mfu"] == pytest.approx(expected, rel=0.01, abs=1e-6) and data["mfu"] > 0
