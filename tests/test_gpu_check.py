"""What `make gpu-check` relies on, checked on CPU in CI: the wheel list, the random-weights
backbone at tiny scale (NF4 too), and reading the saved GPU results."""
import importlib.util
import json
import zipfile
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
GPU_RESULTS = REPO / "benchmarks" / "results"


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def wheels():
    return load_script("gpu_wheels")


def test_every_wheel_is_pinned_once_and_covers_what_the_gpu_machine_lacks(wheels):
    names = [spec.split("==")[0] for spec in wheels.WHEELS]
    assert all("==" in spec for spec in wheels.WHEELS) and len(set(names)) == len(names)
    # DESIGN.md: the lent machine lacks these (wandb and gguf are not needed there: logger=none, no GGUF)
    assert {"bitsandbytes", "hydra-core", "omegaconf", "antlr4-python3-runtime", "trl", "datasets"} <= set(names)
    assert "torch" not in names  # the machine's own torch (2.11) is used


def test_wheels_are_fetched_for_python_312_on_x86_64_linux(wheels, tmp_path):
    command = wheels.download_command("trl==1.16.0", tmp_path)
    assert command[command.index("--python-version") + 1] == "3.12" and "--no-deps" in command
    assert "--only-binary=:all:" in command and "manylinux_2_28_x86_64" in command
    built = wheels.download_command("antlr4-python3-runtime==4.9.3", tmp_path)
    assert built[3] == "wheel"  # source only on PyPI: built here


def fake_wheel(folder: Path, filename: str, size: int = 10) -> None:
    with zipfile.ZipFile(folder / filename, "w") as archive:
        archive.writestr("payload", b"x" * size)


def test_the_folder_check_names_missing_duplicate_and_oversized_wheels(wheels, tmp_path, monkeypatch):
    for spec in wheels.WHEELS:
        name, version = spec.split("==")
        fake_wheel(tmp_path, f"{name.replace('-', '_')}-{version}-py3-none-any.whl")
    assert wheels.check_folder(tmp_path) == []
    (tmp_path / "trl-1.16.0-py3-none-any.whl").unlink()
    fake_wheel(tmp_path, "datasets-4.0.0-py3-none-any.whl")
    monkeypatch.setattr(wheels, "LIMIT_BYTES", 100)
    problems = wheels.check_folder(tmp_path)
    assert "missing trl" in problems
    assert any(p.startswith("two wheels of datasets") for p in problems)
    assert any("over the 0 MiB" in p for p in problems)


def test_the_random_8b_backbone_builds_at_tiny_scale_the_same_every_time_and_quantizes(make_cfg):
    from trainer.backbones import build_random_model, has_random_weights
    from trainer.model import Runtime, backbone_folder, load_base_model

    cfg = make_cfg("backbone=llama-3.1-8b-random", "backbone.load.architecture.hidden_size=64",
                   "backbone.load.architecture.intermediate_size=128", "backbone.load.architecture.num_hidden_layers=2",
                   "backbone.load.architecture.num_attention_heads=4", "backbone.load.architecture.num_key_value_heads=2",
                   "backbone.load.architecture.vocab_size=1024")
    folder = backbone_folder(cfg)
    assert has_random_weights(folder) and not list(folder.glob("*.safetensors"))  # config only, no weight files
    config = json.loads((folder / "config.json").read_text())
    rope = config.get("rope_parameters") or config["rope_scaling"]  # transformers 5 renamed it
    assert rope["rope_type"] == "llama3" and config["num_key_value_heads"] == 2  # 8B's layout
    first, second = (build_random_model(folder, torch.float32, "cpu") for _ in range(2))
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))
    torch.manual_seed(1)
    state = torch.random.get_rng_state()
    build_random_model(folder, torch.float32, "cpu")
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG is untouched
    import bitsandbytes as bnb

    quantized = load_base_model(cfg, Runtime("cpu", torch.bfloat16, "nf4"))
    layers = [m for m in quantized.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 2 * 7 and quantized.is_loaded_in_4bit
    assert type(quantized.get_output_embeddings()) is torch.nn.Linear  # the LM head stays unquantized
    ids = torch.tensor([[1, 5, 9, 12]])
    with torch.no_grad():
        full = first(ids).logits
        nf4 = quantized(ids).logits.float()
    assert torch.isfinite(nf4).all() and torch.corrcoef(torch.stack([full.flatten(), nf4.flatten()]))[0, 1] > 0.9


def test_the_saved_gpu_results_read_back_with_the_card_named(capsys):
    bench = load_script("bench")
    record = bench.report(GPU_RESULTS / "gpu-h200-llama8b-qlora-2026-11-27.json")
    printed = capsys.readouterr().out
    assert record["machine"]["gpu"] == "NVIDIA H200" and "NVIDIA H200" in printed
    summary = record["summary"]
    for runner in ("ftlab", "trl-defaults", "ftlab-bf16-hidden"):
        assert 0 < summary[runner]["mfu"] < 1 and summary[runner]["peak_gpu_mib"] > 0
    assert "peak GPU x" in printed and "ftlab-bf16-hidden / trl-defaults" in printed


def test_gpu_check_names_only_runners_and_options_the_scripts_take():
    import re
    import shlex

    script = (REPO / "scripts" / "gpu_check.sh").read_text()
    bench = load_script("bench")
    named = [runner for call in re.findall(r'^\s*bench\s+"?([\w,$-]+)', script, re.M) for runner in call.split(",")]
    options = re.findall(r"for option in ([\w ]+); do", script)[0].split()
    assert {"ftlab", "trl-defaults", "ftlab-unfused"} <= set(named) and "--no-whole-process" in script
    assert {r for r in named if "$" not in r} | {f"ftlab-{option}" for option in options} <= set(bench.RUNNERS)
    shapes = re.search(r"SHAPES=\((.*?)\)", script, re.S).group(1).replace('"$CACHE"', "/tmp/cache")
    args = load_script("profile_step").parse_args([*shlex.split(shapes), "--warmup", "3", "--steps", "2"])
    assert (args.device, args.quantization, args.max_length, args.fill_length) == ("cuda", "nf4", 2048, True)


def test_gpu_check_benches_the_engine_on_8b_shapes_with_four_adapters(tmp_path, cache_dir):
    import re
    import shlex

    script = (REPO / "scripts" / "gpu_check.sh").read_text()
    call = re.search(r"scripts/bench_engine.py (.*?)2>&1", script, re.S).group(1)
    words = shlex.split(call.replace("\\\n", " ").replace("$CACHE", "/tmp/cache").replace("$OUT", "/tmp/out")
                        .replace("$stamp", "today"))
    engine = load_script("bench_engine")
    args = engine.parse_args(words)
    assert (args.device, args.precision, args.backbone, args.adapters) == ("cuda", "bf16", "llama-3.1-8b-random", 4)
    assert "64" in args.clients.split(",")
    # the same script on CPU, on the tiny Llama: every level runs, base and adapter rows share the batches
    record = engine.main(["--backbone", "tiny-llama", "--adapters", "2", "--clients", "1,4", "--requests", "2",
                          "--prompt-tokens", "8", "--max-tokens", "4", "--cache-dir", cache_dir, "--layouts",
                          "--context", "16", "--json", str(tmp_path / "engine.json")])
    assert [level["clients"] for level in record["levels"]] == [1, 4]
    assert all(level["output_tokens"] == level["requests"] * 4 for level in record["levels"])
    assert record["levels"][1]["rows_per_step"] > 1 and len(record["layouts"]) == 3


def test_gpu_check_benches_reinforcement_on_8b_shapes_and_the_bench_reads_back(tmp_path, cache_dir):
    import re
    import shlex

    script = (REPO / "scripts" / "gpu_check.sh").read_text()
    call = re.search(r"scripts/bench_rft.py (.*?)2>&1", script, re.S).group(1)
    words = shlex.split(call.replace("\\\n", " ").replace("$CACHE", "/tmp/cache").replace("$OUT", "/tmp/out")
                        .replace("$stamp", "today"))
    bench = load_script("bench_rft")
    args = bench.parse_args(words)
    assert (args.device, args.precision, args.backbone, args.group, args.prompts) == \
        ("cuda", "bf16", "llama-3.1-8b-random", 8, 2)
    assert bench.reward("It is Paris.", "paris") == pytest.approx(0.6 + 0.4)  # right, and 3 words
    assert bench.reward(" ".join(["word"] * 40), "Paris") == 0.0
    run = {"step_seconds": [9.0, 2.0, 3.0, 4.0], "train_rewards": [0.1, 0.2, 0.3, 0.5, 0.6, 0.7],
           "heldout_reward": 0.5, "wall_seconds": 30.0, "peak_rss_mb": 2000.0}
    summary = bench.summarise(run)
    assert summary["median_step_s"] == 3.0 and summary["first3_reward"] == pytest.approx(0.2)
    assert "ftlab/trl" in bench.table({"ftlab": summary, "trl": summary | {"median_step_s": 6.0}})
    # ftlab's runner on the tiny Llama: a real job, its steps timed, its held-out reward read back
    result = bench.run_ftlab(bench.parse_args(["--backbone", "tiny-llama", "--steps", "2", "--group", "2",
                                               "--max-new-tokens", "3", "--cache-dir", cache_dir]))
    assert len(result["step_seconds"]) == 2 and len(result["train_rewards"]) == 2 and 0 <= result["heldout_reward"] <= 1


def test_the_dpo_bench_shares_the_harness_and_its_ftlab_runner_trains(cache_dir):
    import re
    import shlex

    bench = load_script("bench_dpo")
    script = (REPO / "scripts" / "gpu_check.sh").read_text()
    call = re.search(r"scripts/bench_dpo.py (.*?)2>&1", script, re.S).group(1)
    words = shlex.split(call.replace("\\\n", " ").replace("$CACHE", "/tmp/cache").replace("$OUT", "/tmp/out")
                        .replace("$stamp", "today"))
    assert (bench.parse_args(words).backbone, bench.parse_args(words).device) == ("llama-3.1-8b-random", "cuda")
    args = bench.parse_args(["--backbone", "tiny-llama", "--steps", "2", "--prompts", "2", "--cache-dir", cache_dir])
    assert args.pairs == 4
    result = bench.run_ftlab(args)
    assert len(result["step_seconds"]) == 2 and result["losses"][0] == pytest.approx(0.6931, abs=1e-3)
    summary = bench.summarise(result | {"wall_seconds": 10.0, "peak_rss_mb": 900.0}, args.pairs)
    assert summary["pairs_per_s"] > 0 and "pairs_per_s" in bench.bench_rft.table({"ftlab": summary, "trl": summary})
