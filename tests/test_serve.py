"""`ftlab serve` driven by the official openai client: files, jobs, events, checkpoints, models,
errors, security, cancel/pause/resume, a server killed mid-job, and a bounded load test."""
import concurrent.futures
import csv
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
from openai import OpenAI

from tests.conftest import chat_example, write_jsonl
from tests.live_server import live_server, serve_process

TERMINAL = ("succeeded", "failed", "cancelled")


@pytest.fixture
def job_overrides(cache_dir):
    return ["backbone=tiny-llama", "logger=none", "train.device=cpu", "train.precision=fp32", f"cache_dir={cache_dir}",
            "moderation=off", "train.checkpoint_every=2"]


@pytest.fixture
def train_file(tmp_path):
    return write_jsonl(tmp_path / "train.jsonl", [chat_example(f"What is {i} + {i}?", str(2 * i)) for i in range(12)])


def client_for(base_url: str, api_key: str = "x") -> OpenAI:
    return OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=60)


def wait_for(client: OpenAI, job_id: str, statuses=TERMINAL, timeout: float = 180):
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in statuses:
            return job
        time.sleep(0.3)
    raise TimeoutError(f"{job_id} is still {job.status}")


def final_loss(run_dir: Path) -> float:
    with open(run_dir / "results.csv") as handle:
        return float(list(csv.DictReader(handle))[-1]["train_loss"])


def test_upload_create_follow_and_read_the_result_file(tmp_path, job_overrides, train_file):
    with live_server(tmp_path / "root", [*job_overrides, "train.max_steps=4"]) as (url, server):
        client = client_for(url)
        uploaded = client.files.create(file=open(train_file, "rb"), purpose="fine-tune")
        assert uploaded.id.startswith("file-") and uploaded.status == "processed" and uploaded.filename == "train.jsonl"
        assert uploaded.bytes == train_file.stat().st_size
        assert client.files.wait_for_processing(uploaded.id).status == "processed"
        assert client.files.content(uploaded.id).content == train_file.read_bytes()
        stored = list((tmp_path / "root" / "files").iterdir())
        assert [p.name for p in stored] == [f"{uploaded.id}.jsonl"]  # the server's name, not the client's

        job = client.fine_tuning.jobs.create(model="gpt-3.5-turbo", training_file=uploaded.id, suffix="api-test",
                                             hyperparameters={"n_epochs": 2}, metadata={"team": "search"})
        assert job.status == "validating_files" and job.training_file == uploaded.id and job.id.startswith("ftjob-")
        assert job.metadata == {"team": "search"} and job.hyperparameters.n_epochs == 2
        job = wait_for(client, job.id)
        assert job.status == "succeeded", job.error
        assert job.fine_tuned_model == f"ft:gpt-3.5-turbo:personal:api-test:{job.id[6:14]}"
        assert job.trained_tokens > 0 and job.finished_at >= job.created_at
        assert job.hyperparameters.batch_size >= 1 and job.method.type == "supervised"

        (result_id,) = job.result_files
        result = client.files.retrieve(result_id)
        assert result.purpose == "fine-tune-results"
        rows = list(csv.reader(io.StringIO(client.files.content(result_id).text)))
        assert rows[0] == ["step", "train_loss", "train_accuracy", "valid_loss", "valid_mean_token_accuracy"]
        assert [int(row[0]) for row in rows[1:]] == [1, 2, 3, 4]

        messages = [event.message for event in client.fine_tuning.jobs.list_events(job.id, limit=100)]
        assert messages[0].startswith("The job has successfully completed")
        order = ["Created fine-tuning job", "Validating training file", "Files validated, moving job to queued state",
                 "Fine-tuning job started", "New fine-tuned model created", "The job has successfully completed"]
        positions = [next(i for i, m in enumerate(reversed(messages)) if m.startswith(prefix)) for prefix in order]
        assert positions == sorted(positions), messages
        metrics = [e for e in client.fine_tuning.jobs.list_events(job.id, limit=100) if e.type == "metrics"]
        assert {"step", "train_loss", "train_mean_token_accuracy"} <= set(metrics[0].data)

        checkpoints = list(client.fine_tuning.jobs.checkpoints.list(job.id, limit=1))  # auto-paged, one a page
        assert [c.step_number for c in checkpoints] == [4, 3]  # each epoch's (3 steps), the last one cut at max_steps
        assert checkpoints[0].id.startswith("ftckpt_")
        assert checkpoints[0].fine_tuned_model_checkpoint == f"{job.fine_tuned_model}:ckpt-step-4"
        assert checkpoints[0].metrics.train_loss == pytest.approx(float(rows[4][1]))

        models = [model.id for model in client.models.list()]
        assert {"gpt-3.5-turbo", "babbage-002", "davinci-002", job.fine_tuned_model} <= set(models)
        assert client.models.retrieve(job.fine_tuned_model).id == job.fine_tuned_model
        assert client.fine_tuning.jobs.list(metadata={"team": "search"}).data[0].id == job.id
        assert client.fine_tuning.jobs.list(metadata={"team": "other"}).data == []

        # the CLI sees the API's job: one record
        listing = subprocess.run([sys.executable, "-m", "trainer", "jobs", "list", f"root={tmp_path / 'root'}", "--json"],
                                 capture_output=True, text=True, check=True)
        assert json.loads(listing.stdout)["data"][0]["id"] == job.id

        deleted = client.models.delete(job.fine_tuned_model)
        assert deleted.deleted and job.fine_tuned_model not in [m.id for m in client.models.list()]
        assert client.fine_tuning.jobs.retrieve(job.id).status == "succeeded"  # the job record stays
        with pytest.raises(openai.ConflictError):
            client.fine_tuning.jobs.cancel(job.id)  # it has finished
        assert client.files.delete(uploaded.id).deleted
        with pytest.raises(openai.NotFoundError):
            client.files.retrieve(uploaded.id)


def test_hosted_validation_fails_jobs_after_creation(tmp_path, job_overrides):
    few = write_jsonl(tmp_path / "few.jsonl", [chat_example(f"q{i}", f"a{i}") for i in range(5)])
    broken = write_jsonl(tmp_path / "broken.jsonl", [chat_example(f"q{i}", f"a{i}") for i in range(11)]
                         + ['{"messages": [{"role": "user"}]}', "not json"])
    with live_server(tmp_path / "root", job_overrides) as (url, server):
        client = client_for(url)
        few_id = client.files.create(file=open(few, "rb"), purpose="fine-tune").id
        broken_id = client.files.create(file=open(broken, "rb"), purpose="fine-tune").id
        job = wait_for(client, client.fine_tuning.jobs.create(model="gpt-3.5-turbo", training_file=few_id).id)
        assert job.status == "failed" and job.error.code == "invalid_n_examples"
        assert job.error.message == "Training file has 5 example(s), but must have at least 10 examples"
        job = wait_for(client, client.fine_tuning.jobs.create(model="gpt-3.5-turbo", training_file=broken_id).id)
        assert job.status == "failed" and job.error.code == "invalid_training_file"
        assert "line 12: [message_missing_key]" in job.error.message and "line 13: [invalid_json]" in job.error.message


def test_client_errors_map_to_the_clients_exceptions(tmp_path, job_overrides, train_file):
    with live_server(tmp_path / "root", job_overrides, api_key="sk-local-secret") as (url, server):
        with pytest.raises(openai.AuthenticationError):
            client_for(url, "wrong").models.list()
        client = client_for(url, "sk-local-secret")
        with pytest.raises(openai.NotFoundError) as missing:
            client.fine_tuning.jobs.retrieve("ftjob-doesnotexist")
        assert missing.value.body["code"] == "job_not_found"
        with pytest.raises(openai.BadRequestError) as unknown:
            client.fine_tuning.jobs.create(model="gpt-3.5-turbo", training_file="file-nope")
        assert unknown.value.body["param"] == "training_file"
        file_id = client.files.create(file=open(train_file, "rb"), purpose="fine-tune").id
        with pytest.raises(openai.BadRequestError) as suffix:
            client.fine_tuning.jobs.create(model="gpt-3.5-turbo", training_file=file_id, suffix="bad suffix/x")
        assert suffix.value.body["code"] == "invalid_suffix"
        with pytest.raises(openai.BadRequestError) as epochs:
            client.fine_tuning.jobs.create(model="gpt-3.5-turbo", training_file=file_id, hyperparameters={"n_epochs": 0})
        assert epochs.value.body["param"] == "hyperparameters.n_epochs"
        with pytest.raises(openai.BadRequestError):
            client.fine_tuning.jobs.create(model="gpt-4-unknown", training_file=file_id)
        with pytest.raises(openai.BadRequestError):
            client.files.create(file=open(train_file, "rb"), purpose="assistants")
        response = httpx.post(f"{url}/fine_tuning/jobs", content=b"{not json",
                              headers={"Authorization": "Bearer sk-local-secret", "Content-Type": "application/json"})
        assert response.status_code in (400, 422) and "Traceback" not in response.text
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
        assert server.index.jobs()[0] == []  # nothing refused was recorded
    for path in (tmp_path / "root").rglob("*"):  # the key never lands in a record
        if path.is_file() and path.suffix in (".json", ".jsonl", ".yaml", ".log", ".sqlite"):
            assert b"sk-local-secret" not in path.read_bytes(), path


def test_paging_walks_every_job_and_event_once(tmp_path, job_overrides):
    few = write_jsonl(tmp_path / "few.jsonl", [chat_example(f"q{i}", f"a{i}") for i in range(3)])
    with live_server(tmp_path / "root", job_overrides) as (url, server):
        client = client_for(url)
        file_id = client.files.create(file=open(few, "rb"), purpose="fine-tune").id
        created = [client.fine_tuning.jobs.create(model="gpt-3.5-turbo", training_file=file_id).id for _ in range(7)]
        walked = [job.id for job in client.fine_tuning.jobs.list(limit=3)]  # auto-paging: 3 + 3 + 1, then stops
        assert walked == created[::-1]
        first = client.fine_tuning.jobs.list(limit=7)
        assert not first.has_more and client.fine_tuning.jobs.list(limit=3, after=created[0]).data == []
        job = wait_for(client, created[0])
        events = [event.id for event in client.fine_tuning.jobs.list_events(job.id, limit=2)]
        assert len(events) == len(set(events)) >= 3  # two pages of 2
        assert events == [event.id for event in client.fine_tuning.jobs.list_events(job.id, limit=100).data]
        files = [f.id for f in client.files.list(limit=1)]
        assert files == [file_id]


def test_cancel_pause_and_resume_a_running_job(tmp_path, job_overrides, train_file):
    slow = ["backbone.load.hidden_size=256", "backbone.load.num_hidden_layers=4"]  # steps slow enough to catch
    with live_server(tmp_path / "root", [*job_overrides, *slow]) as (url, server):
        client = client_for(url)
        file_id = client.files.create(file=open(train_file, "rb"), purpose="fine-tune").id
        long = {"n_epochs": 50, "batch_size": 1}
        first = client.fine_tuning.jobs.create(model="gpt-3.5-turbo", training_file=file_id, hyperparameters=long)
        second = client.fine_tuning.jobs.create(model="gpt-3.5-turbo", training_file=file_id, hyperparameters=long)
        wait_for(client, first.id, ("running",))
        assert client.fine_tuning.jobs.retrieve(second.id).status == "queued"  # max_running_jobs=1: FIFO
        run_dir = tmp_path / "root" / "jobs" / first.id
        while not list((run_dir / "checkpoints").glob("step-*")):
            time.sleep(0.1)
        assert client.fine_tuning.jobs.retrieve(first.id).estimated_finish > time.time() - 5  # from its pace
        client.fine_tuning.jobs.pause(first.id)
        paused = wait_for(client, first.id, ("paused",))
        assert paused.finished_at is None
        step = max(int(p.name[5:]) for p in (run_dir / "checkpoints").glob("step-*"))
        wait_for(client, second.id, ("running",))  # the slot went to the next job
        client.fine_tuning.jobs.cancel(second.id)
        assert wait_for(client, second.id).status == "cancelled"
        client.fine_tuning.jobs.resume(first.id)
        wait_for(client, first.id, ("running",))
        while not any(int(p.name[5:]) > step for p in (run_dir / "checkpoints").glob("step-*")):
            time.sleep(0.1)
        assert "Resumed from checkpoint" in (run_dir / "events.jsonl").read_text()
        cancelled = client.fine_tuning.jobs.cancel(first.id)
        assert cancelled.id == first.id
        assert wait_for(client, first.id).status == "cancelled"
        with pytest.raises(openai.ConflictError) as again:
            client.fine_tuning.jobs.cancel(first.id)
        assert again.value.response.headers["x-should-retry"] == "false"


def test_a_killed_server_and_job_resume_to_the_same_final_loss(tmp_path, job_overrides, train_file):
    settings = [*job_overrides, "train.checkpoint_every=4", "backbone.load.hidden_size=128"]
    root = tmp_path / "root"
    with serve_process(root, settings) as (url, process):
        client = client_for(url)
        file_id = client.files.create(file=open(train_file, "rb"), purpose="fine-tune").id
        reference = wait_for(client, client.fine_tuning.jobs.create(model="gpt-3.5-turbo", training_file=file_id).id)
        assert reference.status == "succeeded"
        job = client.fine_tuning.jobs.create(model="gpt-3.5-turbo", training_file=file_id)
        run_dir = root / "jobs" / job.id
        while not list((run_dir / "checkpoints").glob("step-*")):
            time.sleep(0.02)
        trainer_pid = json.loads((run_dir / ".lock").read_text())["pid"]
        os.killpg(process.pid, signal.SIGKILL)  # the server dies ...
        os.kill(trainer_pid, signal.SIGKILL)  # ... and so does the job's process, as in a machine crash
        process.wait()
    assert json.loads((run_dir / "job.json").read_text())["status"] == "running"
    with serve_process(root, settings) as (url, process):
        client = client_for(url)
        resumed = wait_for(client, job.id)
        assert resumed.status == "succeeded"
        assert "Resumed from checkpoint" in (run_dir / "events.jsonl").read_text()
        assert final_loss(run_dir) == pytest.approx(final_loss(root / "jobs" / reference.id), abs=1e-4)
        assert resumed.result_files
    assert process.returncode == 0  # SIGTERM stops the server cleanly


def test_jobs_dispatch_through_submitit(tmp_path, job_overrides, train_file):
    with live_server(tmp_path / "root", [*job_overrides, "train.max_steps=2", "executor=slurm",
                                         "executor.cluster=local"]) as (url, server):
        client = client_for(url)
        file_id = client.files.create(file=open(train_file, "rb"), purpose="fine-tune").id
        job = wait_for(client, client.fine_tuning.jobs.create(model="gpt-3.5-turbo", training_file=file_id).id)
        assert job.status == "succeeded", job.error
        assert list((tmp_path / "root" / "jobs" / job.id / ".submitit").iterdir())


def test_security_loopback_caps_and_filenames(tmp_path, job_overrides, train_file):
    from trainer.serve.app import check_bind_address

    with pytest.raises(ValueError, match="api_key"):
        check_bind_address("0.0.0.0", None)
    check_bind_address("0.0.0.0", "sk-x")
    check_bind_address("::1", None)
    big = tmp_path / "big.jsonl"
    big.write_bytes(b"x" * (2 * 1024 * 1024))
    with live_server(tmp_path / "root", [*job_overrides, "server.max_upload_mb=1", "server.max_request_kb=4"]) as (url, _):
        client = client_for(url)
        with pytest.raises(openai.APIStatusError) as too_big:
            client.files.create(file=("big.jsonl", big.read_bytes()), purpose="fine-tune")
        assert too_big.value.status_code == 413
        assert list((tmp_path / "root" / "files").iterdir()) == []  # nothing left of a refused upload
        sneaky = client.files.create(file=("../../etc/passwd", train_file.read_bytes()), purpose="fine-tune")
        assert sneaky.filename == "passwd"
        assert (tmp_path / "root" / "files" / f"{sneaky.id}.jsonl").is_file()
        with pytest.raises(openai.APIStatusError) as long_body:
            client.fine_tuning.jobs.create(model="gpt-3.5-turbo", training_file=sneaky.id, metadata={"k": "v" * 5000})
        assert long_body.value.status_code == 413
        assert client.files.retrieve(sneaky.id).id == sneaky.id
        response = httpx.get(f"{url}/files/..%2F..%2Fftlab.sqlite/content")
        assert response.status_code == 404


def test_concurrent_clients_lose_and_duplicate_nothing(tmp_path, job_overrides, train_file):
    few = write_jsonl(tmp_path / "few.jsonl", [chat_example(f"q{i}", f"a{i}") for i in range(3)])

    def ask(client: OpenAI, n: int) -> str:
        reply = client.chat.completions.create(model="gpt-3.5-turbo", temperature=0, max_tokens=6,
                                               messages=[{"role": "user", "content": f"Count to {n}"}])
        return reply.choices[0].message.content

    def client_session(n: int, url: str) -> tuple[list[str], list[str], str]:
        client = client_for(url)
        files = [client.files.create(file=(f"c{n}-{i}.jsonl", few.read_bytes()), purpose="fine-tune").id
                 for i in range(3)]
        jobs = [client.fine_tuning.jobs.create(model="gpt-3.5-turbo", training_file=f).id for f in files]
        client.fine_tuning.jobs.list(limit=5)
        client.files.list()
        return files, jobs, ask(client, n)

    with live_server(tmp_path / "root", job_overrides) as (url, server):
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            sessions = list(pool.map(lambda n: client_session(n, url), range(8)))
        client = client_for(url)
        files = {f for session_files, _, _ in sessions for f in session_files}
        jobs = [j for _, session_jobs, _ in sessions for j in session_jobs]
        assert [answer for _, _, answer in sessions] == [ask(client, n) for n in range(8)]  # nobody got another's reply
        assert len(files) == 24 and len(set(jobs)) == len(jobs) == 24
        assert {f.id for f in client.files.list()} == files
        assert sorted(job.id for job in client.fine_tuning.jobs.list(limit=5)) == sorted(jobs)
        for job_id in jobs:
            assert wait_for(client, job_id).error.code == "invalid_n_examples"


def test_the_readme_quickstart_runs_unchanged(tmp_path, job_overrides):
    """README's "Your openai code, unchanged" script, with only its base_url pointed at this server."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    block = readme.split("<!-- openai-quickstart:start -->")[1].split("<!-- openai-quickstart:end -->")[0]
    script = block.split("```python\n")[1].split("```")[0]
    sample = Path(__file__).resolve().parent.parent / "trainer" / "samples" / "json_output" / "train.jsonl"
    (tmp_path / "train.jsonl").write_bytes(sample.read_bytes())
    with live_server(tmp_path / "root", [*job_overrides, "train.max_steps=3"], api_key="sk-local") as (url, _):
        (tmp_path / "quickstart.py").write_text(script.replace("http://127.0.0.1:8000/v1", url))
        run = subprocess.run([sys.executable, "quickstart.py"], cwd=tmp_path, capture_output=True, text=True,
                             timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.splitlines()
    assert any(line.startswith("ft:gpt-3.5-turbo:personal:json:") for line in lines), run.stdout
    assert any(line.startswith("3,") for line in lines), run.stdout  # the results file's last step


def test_continue_from_an_ft_model_with_a_wandb_integration(tmp_path, job_overrides, train_file):
    overrides = [o for o in job_overrides if o != "logger=none"] + ["logger=wandb", "train.max_steps=2"]
    with live_server(tmp_path / "root", overrides) as (url, server):
        client = client_for(url)
        file_id = client.files.create(file=open(train_file, "rb"), purpose="fine-tune").id
        parent = wait_for(client, client.fine_tuning.jobs.create(model="gpt-3.5-turbo", training_file=file_id).id)
        integration = {"type": "wandb", "wandb": {"project": "support-bot", "name": "round-2", "tags": ["v2", "api"]}}
        child = client.fine_tuning.jobs.create(model=parent.fine_tuned_model, training_file=file_id,
                                               method={"type": "supervised", "supervised": {
                                                   "hyperparameters": {"learning_rate_multiplier": 0.5}}},
                                               integrations=[integration])
        assert child.model == parent.fine_tuned_model and child.integrations[0].wandb.project == "support-bot"
        child = wait_for(client, child.id)
        assert child.status == "succeeded", child.error
        assert child.fine_tuned_model.startswith("ft:gpt-3.5-turbo:personal::")
        assert child.hyperparameters.learning_rate_multiplier == 0.5
    run_dir = tmp_path / "root" / "jobs" / child.id
    request = json.loads((run_dir / "request.json").read_text())  # what the client asked, as data
    assert request["init_adapter"] == str(tmp_path / "root" / "jobs" / parent.id / "adapter")
    assert request["wandb"] == integration["wandb"] and request["hyperparameters"]["learning_rate_multiplier"] == 0.5
    assert "request: " in (run_dir / ".hydra" / "config.yaml").read_text()
    (wandb_run,) = (run_dir / "wandb").glob("offline-run-*")
    assert b"support-bot" in b"".join(path.read_bytes() for path in wandb_run.rglob("*") if path.is_file())
