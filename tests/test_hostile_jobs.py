"""`ftlab serve`'s jobs API driven by a hostile client: config expressions in every client string, hyperparameters
that are not numbers, a server killed mid-launch, files deleted while a job is made from them, deleted models
called by their checkpoints' names, server paths in responses, the hosted checkpoint and billing rules, and the
import order that keeps the CLI at the top."""
import ast
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from omegaconf import OmegaConf
from openai import OpenAI

from tests.conftest import chat_example, write_jsonl
from tests.live_server import live_server, serve_process
from tests.test_serve import TERMINAL, client_for, wait_for
from trainer.serve.executors import LocalExecutor

REPO = Path(__file__).resolve().parent.parent
SECRET = "sk-hostile-5b1e0c7d"


def expressions(variable: str) -> list[str]:
    """`${oc.env:<variable>}` bare, single-quoted, double-quoted and backslash-escaped."""
    bare = "${oc.env:%s}" % variable
    return [bare, f"'{bare}'", f'"{bare}"', "\\" + bare]


PAYLOADS = expressions("HOME") + expressions("FTLAB_API_KEY")


def tiny(cache_dir: str, *extra: str) -> list[str]:
    return ["backbone=tiny-llama", "logger=none", "train.device=cpu", "train.precision=fp32", f"cache_dir={cache_dir}",
            "moderation=off", *extra]


@pytest.fixture
def train_file(tmp_path):
    return write_jsonl(tmp_path / "train.jsonl", [chat_example(f"What is {i} + {i}?", str(2 * i)) for i in range(12)])


def upload(client: OpenAI, path: Path) -> str:
    return client.files.create(file=open(path, "rb"), purpose="fine-tune").id


# ---- 1. client strings are data ------------------------------------------------------------
def test_the_request_record_keeps_every_expression_literal(tmp_path):
    """The job process's side: a request record read back into the composed config and the logger's arguments."""
    from trainer.compose import compose, quote_value
    from trainer.request import JobRequest, logger_options, with_request, write_request

    for payload in PAYLOADS:
        run_dir = tmp_path / f"run{PAYLOADS.index(payload)}"
        request = JobRequest(training_file=str(tmp_path / payload), validation_file=str(tmp_path / payload),
                             suffix=None, init_adapter=payload, metadata={"k": payload},
                             wandb={"project": payload, "name": payload, "tags": PAYLOADS})
        path = write_request(run_dir, request)
        cfg = with_request(compose(["logger=wandb", "data=custom", f"request={quote_value(str(path))}"]))
        assert cfg.data.train_file == cfg.data.validation_file == str(tmp_path / payload)
        assert cfg.init_adapter == payload
        assert OmegaConf.to_container(cfg, resolve=True)["init_adapter"] == payload
        saved = OmegaConf.create(OmegaConf.to_yaml(cfg))  # as .hydra/config.yaml, read back
        assert saved.init_adapter == payload and saved.data.train_file == str(tmp_path / payload)
        assert logger_options(cfg) == {"project": payload, "run_name": payload, "tags": PAYLOADS}


def test_client_strings_are_never_config_expressions(tmp_path, monkeypatch, cache_dir, train_file):
    home = tmp_path / "home-7f3a9c"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("FTLAB_API_KEY", SECRET)
    resolved = (str(home), SECRET)
    root = tmp_path / "root"
    overrides = [o for o in tiny(cache_dir, "train.max_steps=1") if o != "logger=none"] + ["logger=wandb"]
    with live_server(root, overrides, api_key=SECRET) as (url, server):
        client = client_for(url, SECRET)
        http = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {SECRET}"}, timeout=60)
        file_id = upload(client, train_file)

        # fields with a format: refused, and the answer shows nothing resolved
        for payload in PAYLOADS:
            for field, value in (("suffix", payload), ("training_file", payload), ("validation_file", payload),
                                 ("model", payload), ("model", f"ft:gpt-3.5-turbo:personal:{payload}:abcdefgh")):
                response = http.post("/fine_tuning/jobs", json={"model": "gpt-3.5-turbo", "training_file": file_id,
                                                                 field: value})
                assert response.status_code in (400, 404), (field, payload, response.text)
                error = response.json()["error"]
                assert error["param"] == field and set(error) == {"message", "type", "param", "code"}
                assert not any(secret in response.text for secret in resolved), response.text
                if field == "suffix":
                    assert error["code"] == "invalid_suffix" and payload not in error["message"]
            integration = {"type": "wandb", "wandb": {"project": payload}}  # wandb's names have a format too
            response = http.post("/fine_tuning/jobs", json={"model": "gpt-3.5-turbo", "training_file": file_id,
                                                             "integrations": [integration]})
            assert response.status_code == 400 and response.json()["error"]["param"] == "integrations.[0].wandb.project"
            assert not any(secret in response.text for secret in resolved), response.text
        assert server.index.jobs()[0] == [] and not list((root / "jobs").iterdir())  # nothing refused was kept

        # free text: stored and shown as written
        metadata = {f"k{i}": payload for i, payload in enumerate(PAYLOADS)}
        trained = [PAYLOADS[1], PAYLOADS[7]]  # a single-quoted HOME and a backslash-escaped key train to the end
        jobs = {}
        for payload in trained + [p for p in PAYLOADS if p not in trained]:
            integration = {"type": "wandb", "wandb": {"project": "hostile", "name": payload, "tags": PAYLOADS}}
            job = client.fine_tuning.jobs.create(model="gpt-3.5-turbo", training_file=file_id, metadata=metadata,
                                                 integrations=[integration])
            assert job.metadata == metadata and job.integrations[0].wandb.name == payload
            jobs[payload] = job.id
        for payload, job_id in jobs.items():
            if payload not in trained:  # validated by the server (its config composed with the request), then dropped
                wait_for(client, job_id, ("queued", "running", *TERMINAL))
                if client.fine_tuning.jobs.retrieve(job_id).status not in TERMINAL:
                    client.fine_tuning.jobs.cancel(job_id)
        for payload in trained:
            job = wait_for(client, jobs[payload])
            assert job.status == "succeeded", job.error
            run_dir = root / "jobs" / job.id
            assert json.loads((run_dir / "request.json").read_text())["wandb"]["name"] == payload
            (wandb_run,) = (run_dir / "wandb").glob("offline-run-*")
            logged = b"".join(path.read_bytes() for path in wandb_run.rglob("*") if path.is_file())
            assert payload.encode() in logged  # the run's name reached wandb as the literal text
        for job_id in jobs.values():
            wait_for(client, job_id)
            shown = [http.get(f"/fine_tuning/jobs/{job_id}").text, http.get(f"/fine_tuning/jobs/{job_id}/events").text,
                     http.get(f"/fine_tuning/jobs/{job_id}/checkpoints").text, http.get("/fine_tuning/jobs").text]
            assert not any(secret in text for text in shown for secret in resolved)
            assert json.loads(shown[0])["metadata"] == metadata
    for path in root.rglob("*"):  # the records, configs, events, logs and wandb runs of every job
        if path.is_file():
            data = path.read_bytes()
            assert not any(secret.encode() in data for secret in resolved), path


# ---- 2. hyperparameters -----------------------------------------------------------------------
def test_hyperparameters_out_of_range_or_not_finite_are_refused(tmp_path, cache_dir, train_file):
    bad = [("learning_rate_multiplier", "NaN"), ("learning_rate_multiplier", "Infinity"),
           ("learning_rate_multiplier", "-Infinity"), ("learning_rate_multiplier", "1e999"),
           ("learning_rate_multiplier", "0"), ("learning_rate_multiplier", "-1"), ("learning_rate_multiplier", "11"),
           ("learning_rate_multiplier", "true"), ("batch_size", str(10**21)), ("batch_size", "0"),
           ("batch_size", "257"), ("batch_size", "2.5"), ("batch_size", '"8"'), ("n_epochs", "0"), ("n_epochs", "51"),
           ("n_epochs", "1e999"), ("n_epochs", "NaN")]
    with live_server(tmp_path / "root", tiny(cache_dir)) as (url, server):
        file_id = upload(client_for(url), train_file)
        for key, raw in bad:
            for where, param in (('"hyperparameters": {%s}', f"hyperparameters.{key}"),
                                 ('"method": {"type": "supervised", "supervised": {"hyperparameters": {%s}}}',
                                  f"method.supervised.hyperparameters.{key}")):
                body = ('{"model": "gpt-3.5-turbo", "training_file": "%s", ' % file_id
                        + where % f'"{key}": {raw}' + "}")  # raw JSON: NaN and Infinity as Python's json reads them
                response = httpx.post(f"{url}/fine_tuning/jobs", content=body.encode(), timeout=30,
                                      headers={"Content-Type": "application/json", "Authorization": "Bearer x"})
                assert response.status_code == 400, (key, raw, response.text)
                error = response.json()["error"]
                assert set(error) == {"message", "type", "param", "code"} and error["param"] == param, error
        assert server.index.jobs()[0] == [] and not list((tmp_path / "root" / "jobs").iterdir())
        client = client_for(url)
        good = client.fine_tuning.jobs.create(model="gpt-3.5-turbo", training_file=file_id, hyperparameters={
            "n_epochs": 50, "batch_size": 256, "learning_rate_multiplier": 10})
        assert good.hyperparameters.batch_size == 256 and good.hyperparameters.learning_rate_multiplier == 10
        client.fine_tuning.jobs.cancel(good.id)
        assert wait_for(client, good.id).status == "cancelled"


# ---- 3. races and restarts ----------------------------------------------------------------------
class DiesAfterLaunch(LocalExecutor):
    """The server's executor in the mid-launch test: it starts the job's process, notes its pid, then kills the
    server at once, before the server has handed the process its lock or recorded the job as running."""

    def start(self, run_dir: Path, args: list[str]):
        handle = super().start(run_dir, args)
        (Path(run_dir).parent.parent / "first-process.pid").write_text(str(handle.pid))
        os.kill(os.getpid(), signal.SIGKILL)
        return handle


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return open(f"/proc/{pid}/stat").read().split(") ")[-1][:1] != "Z"
    except (ProcessLookupError, FileNotFoundError):
        return False


def test_a_server_killed_mid_launch_starts_no_duplicate_and_spends_no_restart(tmp_path, cache_dir, train_file):
    root = tmp_path / "root"
    settings = tiny(cache_dir, "train.max_steps=3")
    with serve_process(root, [*settings, "executor._target_=tests.test_hostile_jobs.DiesAfterLaunch"]) as (url, server):
        client = client_for(url)
        job = client.fine_tuning.jobs.create(model="gpt-3.5-turbo", training_file=upload(client, train_file))
        server.wait(timeout=120)  # killed by its executor the moment the job's process started
    assert server.returncode == -signal.SIGKILL
    first = int((root / "first-process.pid").read_text())
    with serve_process(root, settings) as (url, _):
        client = client_for(url)
        done = wait_for(client, job.id)
        assert done.status == "succeeded", done.error
        events = [event.message for event in client.fine_tuning.jobs.list_events(job.id, limit=200)]
    assert sum(message.startswith("Fine-tuning job started") for message in events) == 1, events
    assert not any("ended unexpectedly" in message for message in events)
    deadline = time.time() + 90
    while _alive(first) and time.time() < deadline:  # never handed the lock: it ends without touching the job
        time.sleep(0.2)
    assert not _alive(first)
    import sqlite3

    with sqlite3.connect(root / "ftlab.sqlite") as db:
        assert db.execute("SELECT restarts FROM jobs WHERE id = ?", (job.id,)).fetchone() == (0,)


def test_a_job_process_waits_for_its_lock_and_a_queued_job_with_a_live_process_is_adopted(tmp_path):
    from types import SimpleNamespace

    from trainer.run import RunDirLocked, RunLock
    from trainer.serve.executors import AdoptedHandle
    from trainer.serve.runner import JobRunner

    run_dir = tmp_path / "run"
    waiter = ("import sys, time\nfrom trainer.run import RunLock, RunDirLocked\nRunLock.HANDOVER_SECONDS = 20\n"
              "try:\n    RunLock(sys.argv[1]).acquire(handed=True)\nexcept RunDirLocked:\n    sys.exit(3)\n"
              "print('locked', flush=True)\ntime.sleep(60)\n")
    first, second = (subprocess.Popen([sys.executable, "-c", waiter, str(run_dir)], cwd=REPO, stdout=subprocess.PIPE,
                                      text=True) for _ in range(2))
    try:
        time.sleep(1)
        assert first.poll() is None and second.poll() is None  # neither trains without its lock
        RunLock(run_dir).hand_to(second.pid)
        assert second.stdout.readline().strip() == "locked"
        assert first.wait(timeout=30) == 3  # the lock went to another process: this one gives up, touching nothing
        with pytest.raises(RunDirLocked):
            RunLock(run_dir).hand_to(first.pid)  # the lock names a live process: nobody else gets it
        moved, started = [], []
        index = SimpleNamespace(move_job=lambda job_id, states, state: moved.append((job_id, states, state)))
        runner = JobRunner(SimpleNamespace(index=index), SimpleNamespace(start=lambda *a: started.append(a)))
        runner._launch({"id": "ftjob-x", "run_dir": str(run_dir), "request": {"overrides": []}})
        assert started == [] and isinstance(runner.handles["ftjob-x"], AdoptedHandle)  # adopted, not started again
        assert moved == [("ftjob-x", ("queued",), "running")]
    finally:
        for process in (first, second):
            process.kill()
            process.wait()


def test_a_file_deleted_while_a_job_is_created_from_it(tmp_path, cache_dir, train_file, monkeypatch):
    import trainer.serve.jobs_api as jobs_api

    create = jobs_api.Job.create
    creating = threading.Event()

    def slow_create(*args, **kwargs):  # widens the window between finding the file and recording the job
        creating.set()
        time.sleep(1)
        return create(*args, **kwargs)

    with live_server(tmp_path / "root", tiny(cache_dir, "train.max_steps=1")) as (url, server):
        client = client_for(url)
        root = tmp_path / "root"
        kept = upload(client, train_file)
        monkeypatch.setattr(jobs_api.Job, "create", staticmethod(slow_create))
        made = {}
        worker = threading.Thread(target=lambda: made.setdefault(
            "job", client.fine_tuning.jobs.create(model="gpt-3.5-turbo", training_file=kept)))
        worker.start()
        assert creating.wait(30)
        with pytest.raises(openai.ConflictError) as in_use:  # kept for the job being made from it
            client.files.delete(kept)
        assert in_use.value.body["code"] == "file_in_use"
        worker.join(60)
        assert client.files.retrieve(kept).id == kept and wait_for(client, made["job"].id).status == "succeeded"
        monkeypatch.setattr(jobs_api.Job, "create", create)

        gone = upload(client, train_file)
        assert client.files.delete(gone).deleted
        with pytest.raises(openai.BadRequestError) as refused:  # the other order: a clean 400
            client.fine_tuning.jobs.create(model="gpt-3.5-turbo", training_file=gone)
        assert refused.value.body["param"] == "training_file"

        def broken(*args, **kwargs):
            raise OSError("disk full")

        monkeypatch.setattr(jobs_api.Job, "create", staticmethod(broken))
        response = httpx.post(f"{url}/fine_tuning/jobs", json={"model": "gpt-3.5-turbo", "training_file": kept})
        assert response.status_code == 500 and set(response.json()["error"]) == {"message", "type", "param", "code"}
        monkeypatch.setattr(jobs_api.Job, "create", create)

        def race(index: int):  # create and delete at once: either the job or the delete wins, cleanly
            file_id = upload(client, train_file)
            outcomes = {}

            def make():
                try:
                    outcomes["job"] = client.fine_tuning.jobs.create(model="gpt-3.5-turbo", training_file=file_id).id
                except openai.APIStatusError as error:
                    outcomes["job"] = error.status_code

            def remove():
                try:
                    outcomes["delete"] = client.files.delete(file_id).deleted
                except openai.APIStatusError as error:
                    outcomes["delete"] = error.status_code

            threads = [threading.Thread(target=make), threading.Thread(target=remove)]
            for thread in threads[:: 1 if index % 2 else -1]:
                thread.start()
            for thread in threads:
                thread.join(60)
            return outcomes

        for index in range(12):
            outcome = race(index)
            assert outcome in ({"job": outcome.get("job"), "delete": 409}, {"job": 400, "delete": True}), outcome
            if outcome["delete"] == 409:
                try:
                    client.fine_tuning.jobs.cancel(outcome["job"])
                except openai.ConflictError:
                    pass  # it has already finished
        recorded = {row["id"] for row in server.index.jobs(limit=1000)[0]}
        assert {path.name for path in (root / "jobs").iterdir()} == recorded  # no run dir without its job


def test_a_deleted_model_is_gone_under_every_name(tmp_path, cache_dir, train_file):
    with live_server(tmp_path / "root", tiny(cache_dir, "train.max_steps=6")) as (url, server):
        client = client_for(url)
        file_id = upload(client, train_file)
        job = wait_for(client, client.fine_tuning.jobs.create(model="gpt-3.5-turbo", training_file=file_id,
                                                              hyperparameters={"n_epochs": 2}).id)
        assert job.status == "succeeded", job.error
        checkpoint = client.fine_tuning.jobs.checkpoints.list(job.id).data[-1].fine_tuned_model_checkpoint
        names = [job.fine_tuned_model, checkpoint]
        for name in names:  # served before the delete
            reply = client.chat.completions.create(model=name, messages=[{"role": "user", "content": "hi"}],
                                                   max_tokens=2)
            assert reply.choices
        assert client.models.delete(job.fine_tuned_model).deleted
        for name in names:
            with pytest.raises(openai.NotFoundError):
                client.chat.completions.create(model=name, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
            with pytest.raises(openai.NotFoundError):
                client.fine_tuning.jobs.create(model=name, training_file=file_id)
            with pytest.raises(openai.NotFoundError):
                client.models.retrieve(name)
        assert server.index.jobs()[0][0]["id"] == job.id  # nothing was created from it
        models = httpx.get(f"{url.removesuffix('/v1')}/ui/api/models").json()["data"]
        assert not any(model["id"] in names for model in models)  # nor offered in the playground


# ---- 4. no server paths in responses ------------------------------------------------------------
class CrashingExecutor(LocalExecutor):
    """Every job's process dies at once, without recording anything (as a killed process would)."""

    def start(self, run_dir: Path, args: list[str]):
        from trainer.serve.executors import ProcessHandle

        return ProcessHandle(subprocess.Popen([sys.executable, "-c", "import sys; sys.exit(3)"]))


def test_no_server_path_in_any_response(tmp_path, cache_dir, train_file, monkeypatch):
    home = tmp_path / "home-2d8e41"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    root = tmp_path / "root"
    hidden = (str(root), str(root.resolve()), str(home), str(tmp_path))
    broken = write_jsonl(tmp_path / "broken.jsonl", [chat_example(f"q{i}", f"a{i}") for i in range(11)] + ["not json"])
    responses = []

    def read_everything(url: str, job_ids: list[str]) -> None:
        http = httpx.Client(base_url=url, timeout=60)
        responses.extend([http.get("/fine_tuning/jobs").text, http.get("/files").text])
        for job_id in job_ids:
            for path in ("", "/events?limit=1000", "/checkpoints"):
                responses.append(http.get(f"/fine_tuning/jobs/{job_id}{path}").text)
        for file in http.get("/files").json()["data"]:
            responses.append(http.get(f"/files/{file['id']}").text)

    with live_server(root, tiny(cache_dir, "train.max_steps=4", "train.checkpoint_every=2")) as (url, _):
        client = client_for(url)
        good = client.fine_tuning.jobs.create(model="gpt-3.5-turbo", training_file=upload(client, train_file))
        bad = client.fine_tuning.jobs.create(model="gpt-3.5-turbo", training_file=upload(client, broken))
        assert wait_for(client, good.id).status == "succeeded" and wait_for(client, bad.id).status == "failed"
        read_everything(url, [good.id, bad.id])
        events = (root / "jobs" / good.id / "events.jsonl").read_text()
        assert "Checkpoint saved" in events and str(root) not in "".join(responses)
    with live_server(root, tiny(cache_dir, "server.max_job_restarts=0",
                                "executor._target_=tests.test_hostile_jobs.CrashingExecutor")) as (url, _):
        client = client_for(url)
        died = wait_for(client, client.fine_tuning.jobs.create(model="gpt-3.5-turbo",
                                                               training_file=upload(client, train_file)).id)
        assert died.status == "failed" and died.error.code == "job_process_died"
        assert "process.log" in died.error.message  # named, relative to the job's run dir
        read_everything(url, [good.id, bad.id, died.id])
    for text in responses:
        assert not any(path in text for path in hidden), text[:2000]
    assert len(responses) > 15


# ---- 5 and 6. checkpoints and trained tokens, as hosted -------------------------------------------
@pytest.fixture(scope="module")
def four_epochs(tmp_path_factory, cache_dir):
    """A server with one finished 4-epoch job (12 examples, batch size 4: 3 steps an epoch)."""
    tmp = tmp_path_factory.mktemp("four-epochs")
    train = write_jsonl(tmp / "train.jsonl", [chat_example(f"What is {i} + {i}?", str(2 * i)) for i in range(12)])
    with live_server(tmp / "root", tiny(cache_dir)) as (url, server):
        client = client_for(url)
        job = client.fine_tuning.jobs.create(model="gpt-3.5-turbo", training_file=upload(client, train),
                                             hyperparameters={"n_epochs": 4, "batch_size": 4})
        job = wait_for(client, job.id)
        assert job.status == "succeeded", job.error
        yield url, client, job, tmp / "root" / "jobs" / job.id


def test_a_job_publishes_the_checkpoints_of_its_last_three_epochs(four_epochs):
    url, client, job, run_dir = four_epochs
    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert [c.step_number for c in checkpoints] == [12, 9, 6]  # end of epochs 4, 3, 2; newest first
    assert [c.fine_tuned_model_checkpoint for c in checkpoints] == [f"{job.fine_tuned_model}:ckpt-step-{n}"
                                                                    for n in (12, 9, 6)]
    reply = client.chat.completions.create(model=checkpoints[-1].fine_tuned_model_checkpoint, max_tokens=2,
                                           messages=[{"role": "user", "content": "hi"}])
    assert reply.choices
    dashboard = httpx.get(f"{url.removesuffix('/v1')}/ui/api/models").json()["data"]
    assert {m["id"] for m in dashboard if m["kind"] == "checkpoint"} == {c.fine_tuned_model_checkpoint
                                                                         for c in checkpoints}


def test_trained_tokens_is_the_billed_count(four_epochs):
    url, client, job, run_dir = four_epochs
    estimate = json.loads((run_dir / "estimate.json").read_text())
    assert job.trained_tokens == estimate["billed_tokens"] == estimate["billed_tokens_per_epoch"] * 4
    record = json.loads((run_dir / "job.json").read_text())
    assert record["backbone_tokens"] > 0 and record["trained_tokens"] == job.trained_tokens


# ---- 7. the CLI is the top of the house --------------------------------------------------------------
def test_no_module_under_trainer_imports_the_cli():
    importers = []
    for path in (REPO / "trainer").rglob("*.py"):
        if path.name == "__main__.py" or path == REPO / "trainer" / "cli.py":
            continue  # the entry point runs the CLI; nothing else may import it
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
                     if isinstance(node, ast.ImportFrom) else [])
            if any(name == "trainer.cli" or name.startswith("trainer.cli.") for name in names):
                importers.append(str(path.relative_to(REPO)))
    assert importers == []
    loaded = subprocess.run([sys.executable, "-c", "import sys, trainer.serve.app, trainer.serve.runner, "
                             "trainer.serve.jobs_api, trainer.serve.ui.reports, trainer.jobs, trainer.train; "
                             "print('trainer.cli' in sys.modules)"], cwd=REPO, capture_output=True, text=True)
    assert loaded.stdout.strip() == "False", loaded.stderr
