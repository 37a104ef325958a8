"""The job store: run dirs under a root are the jobs; listing pages as the hosted API does,
references (id, ft: name, run dir, latest, checkpoint) resolve, and the job's config comes back typed."""
import json

import pytest
from omegaconf import OmegaConf

from trainer.cli import main
from trainer.jobs import (
    JobNotFound,
    list_checkpoints,
    list_events,
    list_jobs,
    load_job_config,
    resolve_job,
    scan_jobs,
)
from trainer.schema import DataFormat, Device


def fake_job(root, name: str, created_at: int, status: str = "succeeded", job_id: str | None = None):
    run_dir = root / name
    (run_dir / "adapter").mkdir(parents=True)
    (run_dir / "adapter" / "adapter_config.json").write_text("{}")
    job_id = job_id or f"ftjob-{name:0<24}"
    record = {"object": "fine_tuning.job", "id": job_id, "status": status, "model": "gpt-3.5-turbo",
              "created_at": created_at, "fine_tuned_model": f"ft:gpt-3.5-turbo:personal::{job_id[6:14]}",
              "backbone": "tiny-llama", "trained_tokens": 100, "error": None}
    (run_dir / "job.json").write_text(json.dumps(record))
    events = [{"created_at": created_at + i, "level": "info", "message": f"event {i}", "type": "message", "data": {}}
              for i in range(5)]
    (run_dir / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    return run_dir


@pytest.fixture
def store(tmp_path):
    """Five jobs under two date folders (one failed), like outputs/train/<day>/<time>/."""
    root = tmp_path / "outputs"
    for n in range(5):
        fake_job(root / "train" / f"day{n % 2}", f"job{n}", 1000 + n, "failed" if n == 4 else "succeeded")
    return root


def test_list_is_newest_first_and_pages_with_after_and_limit(store):
    first = list_jobs(str(store), limit=2)
    assert first["object"] == "list" and first["has_more"] is True
    ids = [job["id"][:10] for job in first["data"]]
    assert ids == ["ftjob-job4", "ftjob-job3"]
    second = list_jobs(str(store), limit=2, after=first["data"][-1]["id"])
    assert [job["id"][:10] for job in second["data"]] == ["ftjob-job2", "ftjob-job1"] and second["has_more"]
    last = list_jobs(str(store), limit=2, after=second["data"][-1]["id"])
    assert [job["id"][:10] for job in last["data"]] == ["ftjob-job0"] and last["has_more"] is False
    assert len(list_jobs(str(store))["data"]) == 5  # limit defaults to 20
    with pytest.raises(JobNotFound, match="after="):
        list_jobs(str(store), after="ftjob-nope")


def test_root_comes_from_ftlab_outputs_then_cwd(store, monkeypatch, tmp_path):
    monkeypatch.setenv("FTLAB_OUTPUTS", str(store))
    assert len(scan_jobs()) == 5
    monkeypatch.delenv("FTLAB_OUTPUTS")
    monkeypatch.chdir(tmp_path)  # ./outputs
    assert len(scan_jobs()) == 5


def test_references_resolve_to_their_job(store):
    job = scan_jobs(str(store))[2]
    assert resolve_job(job.id, str(store)).run_dir == job.run_dir
    assert resolve_job(job.record["fine_tuned_model"], str(store)).run_dir == job.run_dir
    assert resolve_job(str(job.run_dir)).id == job.id  # a run dir needs no store
    assert resolve_job("latest", str(store)).id.startswith("ftjob-job3")  # job4 failed
    with pytest.raises(JobNotFound, match="ftlab jobs list"):
        resolve_job("ftjob-unknown", str(store))
    with pytest.raises(JobNotFound, match="not a run dir"):
        resolve_job("gpt-4", str(store))


def test_a_copied_run_dir_makes_the_id_ambiguous(store):
    job = scan_jobs(str(store))[0]
    fake_job(store / "copy", "dup", 5, job_id=job.id)
    with pytest.raises(JobNotFound, match="matches 2 run dirs"):
        resolve_job(job.id, str(store))


def test_events_newest_first_with_ids_and_paging(store):
    job = scan_jobs(str(store))[0]
    page = list_events(job, limit=2)
    assert [e["message"] for e in page["data"]] == ["event 4", "event 3"] and page["has_more"]
    assert page["data"][0]["id"].startswith("ftevent-")
    rest = list_events(job, limit=10, after=page["data"][-1]["id"])
    assert [e["message"] for e in rest["data"]] == ["event 2", "event 1", "event 0"] and not rest["has_more"]


def test_checkpoints_carry_metrics_and_resolve_by_name(store):
    job = scan_jobs(str(store))[0]
    for epoch, step in enumerate((2, 4, 5), 1):  # epoch checkpoints at 2 and 4; a resume checkpoint at 5
        (job.run_dir / "checkpoints" / f"step-{step:06d}" / "adapter").mkdir(parents=True)
        if step != 5:
            (job.run_dir / "checkpoints" / f"step-{step:06d}" / "epoch.json").write_text(json.dumps({"epoch": epoch}))
    (job.run_dir / "results.csv").write_text("step,train_loss,train_accuracy,valid_loss,valid_mean_token_accuracy\n"
                                             "2,1.5,0.5,,\n4,1.0,0.6,1.2,0.55\n")
    checkpoints = list_checkpoints(job)
    assert [c["step_number"] for c in checkpoints] == [4, 2]
    assert all(c["id"].startswith("ftckpt_") for c in checkpoints) and len({c["id"] for c in checkpoints}) == 2
    assert checkpoints[0]["metrics"] == {"train_loss": 1.0, "train_accuracy": 0.6, "valid_loss": 1.2,
                                         "valid_mean_token_accuracy": 0.55}
    name = checkpoints[1]["fine_tuned_model_checkpoint"]
    assert name == f"{job.record['fine_tuned_model']}:ckpt-step-2"
    resolved = resolve_job(name, str(store))
    assert resolved.adapter_dir == job.run_dir / "checkpoints" / "step-000002" / "adapter"
    for unlisted in (3, 5):  # none there; a resume checkpoint is no published model
        with pytest.raises(JobNotFound, match="checkpoint not kept"):
            resolve_job(f"{job.record['fine_tuned_model']}:ckpt-step-{unlisted}", str(store))


def run_cli(capsys, *args) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as stop:
        main(["jobs", *args])
    out = capsys.readouterr()
    return stop.value.code, out.out, out.err


def test_cli_list_table_json_and_pagination_hint(store, capsys):
    code, out, _ = run_cli(capsys, "list", f"root={store}", "limit=3")
    assert code == 0 and out.splitlines()[0].split()[:3] == ["ID", "STATUS", "FINE-TUNED"]
    assert "after=ftjob-job2" in out
    code, out, _ = run_cli(capsys, "list", "--root", str(store), "--json", "limit=1")
    listing = json.loads(out)
    assert code == 0 and listing["has_more"] and listing["data"][0]["id"].startswith("ftjob-job4")


def test_cli_show_events_checkpoints_and_errors(store, capsys):
    job = scan_jobs(str(store))[1]
    code, out, _ = run_cli(capsys, "show", job.record["fine_tuned_model"], f"root={store}")
    assert code == 0 and job.id in out and str(job.run_dir) in out
    code, out, _ = run_cli(capsys, "show", job.id, f"root={store}", "--json")
    assert json.loads(out)["id"] == job.id
    code, out, _ = run_cli(capsys, "events", job.id, f"root={store}", "limit=1", "--json")
    assert len(json.loads(out)["data"]) == 1
    code, out, _ = run_cli(capsys, "checkpoints", str(job.run_dir))
    assert code == 0 and "no checkpoints" in out
    code, _, err = run_cli(capsys, "show", "ftjob-missing", f"root={store}")
    assert code == 2 and "no such job" in err
    code, _, err = run_cli(capsys, "list", "limit=x")
    assert code == 2 and "limit=x" in err


def test_job_config_comes_back_typed_with_the_commands_settings(make_cfg, tmp_path):
    trained = make_cfg("train.device=cpu", "data=terse")
    run_dir = fake_job(tmp_path, "job", 1)
    (run_dir / ".hydra").mkdir()
    OmegaConf.save(OmegaConf.to_container(trained, enum_to_str=True), run_dir / ".hydra" / "config.yaml")
    command = make_cfg("generation.temperature=0.5", "data.validation_file=mine.jsonl", "eval.max_examples=3")
    cfg = load_job_config(resolve_job(str(run_dir)), command,
                          ("generation.temperature=0.5", "data.validation_file=mine.jsonl", "eval.max_examples=3"))
    assert cfg.model.format == DataFormat.chat and cfg.train.device == Device.cpu  # enums again
    assert cfg.data.name == "terse" and cfg.data.task == "terse"  # the job's data …
    assert cfg.data.validation_file == "mine.jsonl"  # … except what the command overrode
    assert cfg.generation.temperature == 0.5 and cfg.eval.max_examples == 3
    (run_dir / ".hydra" / "config.yaml").unlink()
    with pytest.raises(JobNotFound, match="composed config is missing"):
        load_job_config(resolve_job(str(run_dir)), command)


def test_a_job_recorded_before_the_lora_optim_and_scheduler_groups_still_loads(tmp_path):
    from omegaconf import OmegaConf

    from trainer.jobs import JobRef, load_job_config

    (tmp_path / ".hydra").mkdir()
    old = {"backbone": {"name": "tiny-llama", "load": {"_target_": "trainer.backbones.tiny_llama"}},
           "train": {"lora": {"r": 8, "alpha": 16, "dropout": 0.05, "target_modules": None},
                     "weight_decay": 0.01, "warmup_ratio": 0.1, "max_steps": 3}}
    OmegaConf.save(OmegaConf.create(old), tmp_path / ".hydra" / "config.yaml")
    cfg = load_job_config(JobRef(record={}, run_dir=tmp_path, adapter_dir=tmp_path / "adapter"))
    assert cfg.lora.r == 8 and cfg.lora.dropout == 0.05 and cfg.train.max_steps == 3
    assert cfg.optim.weight_decay == 0.01 and cfg.scheduler.warmup_ratio == 0.1
