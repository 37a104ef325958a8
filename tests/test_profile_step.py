"""scripts/profile_step.py: kernel names sort into kinds, and a CPU profile of the tiny Llama comes out whole."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def profile_step():
    sys.path.insert(0, str(REPO / "scripts"))
    spec = importlib.util.spec_from_file_location("profile_step", REPO / "scripts" / "profile_step.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name,kind", [
    ("nvjet_tst_192x192_64x4_2x1_v_bz_coopB_TNT", "matmul"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64", "matmul"),
    ("void kDequantizeBlockwise<__nv_bfloat16, 512, 64, 8, 2>(float*, unsigned char*, ...)", "4-bit dequantize / gemm"),
    ("void pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<...>", "attention"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3", "attention"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<c10::BFloat16>, ...>",
     "elementwise / reduce"),
    ("void at::native::(anonymous namespace)::fused_adamw_kernel", "optimizer"),
    ("Memcpy HtoD (Pageable -> Device)", "copy / cast"),
    ("_swiglu_forward_kernel", "elementwise / reduce"), ("_rms_norm_forward_kernel", "norm"),
    ("kOptimizerStatic8bit2StateBlockwise", "optimizer"),
    ("aten::mm", "matmul"), ("aten::addmm_", "matmul"), ("aten::mul", "elementwise / reduce"),
    ("ChunkedHeadCrossEntropy", "cross-entropy / softmax"), ("something_new", "other"),
])
def test_kernel_and_operator_names_sort_into_kinds(profile_step, name, kind):
    assert profile_step.kind_of(name) == kind


def test_summary_is_per_step_and_shares_add_up(profile_step):
    events = [("nvjet_gemm", 600.0, 1), ("nvjet_gemm", 400.0, 1), ("kDequantize", 200.0, 2), ("mystery", 200.0, 2)]
    summary = profile_step.summarise_events(events, steps=2, wall_s=0.002, gpu=True)
    assert summary["step_ms"] == 1.0 and summary["busy_ms"] == 0.7 and summary["busy_fraction"] == 0.7
    assert summary["kinds"]["matmul"] == {"ms_per_step": 0.5, "share": pytest.approx(0.5 / 0.7, abs=1e-4)}
    assert list(summary["kinds"]) == ["matmul", "4-bit dequantize / gemm", "other"]  # biggest first
    assert summary["top"][0] == {"name": "nvjet_gemm", "kind": "matmul", "ms_per_step": 0.5, "calls_per_step": 1}
    assert sum(k["share"] for k in summary["kinds"].values()) == pytest.approx(1.0, abs=1e-3)


def test_a_cpu_profile_of_the_tiny_llama(profile_step, cache_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "profile.json"
    monkeypatch.setattr(sys, "argv", ["profile_step.py", "--backbone", "tiny-llama", "--precision", "fp32",
                                      "--warmup", "1", "--steps", "2", "--cache-dir", cache_dir, "--out", str(out)])
    profile_step.main()
    record = json.loads(out.read_text())
    profile = record["profile"]
    assert profile["steps"] == 2 and profile["unit"].startswith("CPU") and profile["step_ms"] > 0
    assert "matmul" in profile["kinds"] and profile["top"]
    assert record["settings"]["warmup"] == 1 and record["machine"]["cores"] >= 1
    assert "profiled steps" in capsys.readouterr().out
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # the chart beside the JSON
