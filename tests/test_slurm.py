"""ftlab on a real Slurm cluster: slurmctld and slurmd on this machine (scripts/slurm_cluster.sh), driven
through submitit as on a shared cluster. An API job runs as a Slurm job and `cancel` becomes `scancel`; a
sweep runs as Slurm jobs; a job requeued mid-training (`scontrol requeue`, submitit's checkpoint signal)
resumes from its newest checkpoint and ends with the loss of a run that never stopped; two Slurm tasks
train data-parallel with the losses of one process, by `srun` and as an API job's tasks.

Needs Debian's slurm-wlm and munge, and root (slurmd must run as root):
    apt-get install -y slurm-wlm munge   (as root; .ci/run does it)
Without them these tests are skipped with that message, or fail where FTLAB_REQUIRE_SLURM=1 (as in CI).
"""
import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from openai import OpenAI

from tests.conftest import chat_example, write_jsonl
from tests.live_server import live_server
from tests.test_serve import TERMINAL, wait_for

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
INSTALL = "apt-get install -y slurm-wlm munge  (as root; .ci/run does it)"
TINY = ["backbone=tiny-llama", "logger=none", "train.device=cpu", "train.precision=fp32", "moderation=off"]
# what a job asks of this one-node cluster: one core, the partition's memory, no GPU
EXECUTOR = ["executor=slurm", "executor.gpus_per_node=0", "executor.cpus_per_task=1", "executor.mem_gb=null"]
LAUNCHER = ["launcher=slurm", "hydra.launcher.gpus_per_node=null", "hydra.launcher.cpus_per_task=1",
            "hydra.launcher.mem_gb=null"]


def _missing() -> str | None:
    for program in ("munged", "slurmctld", "slurmd", "sbatch"):
        if not (shutil.which(program) or Path("/usr/sbin", program).exists()):
            return f"{program} is not installed"
    if os.geteuid() != 0:
        return "they must start slurmd as root"
    return None


@pytest.fixture(scope="session")
def slurm():
    """A one-node cluster for the session (an already running one is used as it is, and left running)."""
    missing = _missing()
    if missing:
        reason = f"Slurm tests need a local cluster: {missing}. Install: {INSTALL}"
        if os.environ.get("FTLAB_REQUIRE_SLURM"):
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)
    script = REPO / "scripts" / "slurm_cluster.sh"
    running = subprocess.run(["bash", str(script), "status"], capture_output=True, text=True).returncode == 0
    started = subprocess.run(["bash", str(script), "start"], capture_output=True, text=True, timeout=120)
    assert started.returncode == 0, started.stdout + started.stderr
    conf = started.stdout.rsplit("SLURM_CONF=", 1)[1].strip()
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = conf
    yield conf
    if previous is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = previous
    if not running:
        subprocess.run(["bash", str(script), "stop"], capture_output=True, timeout=120)


@pytest.fixture
def train_file(tmp_path):
    return write_jsonl(tmp_path / "train.jsonl", [chat_example(f"Spell {i} in words", f"number {i}") for i in range(24)])


def scontrol(job_id: str) -> dict:
    """`scontrol show job` as a dict of its KEY=value fields."""
    shown = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True, check=True).stdout
    return dict(field.split("=", 1) for field in shown.split() if "=" in field)


def slurm_state(job_id: str, timeout: float = 60) -> str:
    """The job's state once it has ended (its process may write its result a moment before Slurm sees it end)."""
    deadline = time.time() + timeout
    while (state := scontrol(job_id)["JobState"]) in ("RUNNING", "COMPLETING") and time.time() < deadline:
        time.sleep(0.2)
    return state


def slurm_job_id(run_dir: Path) -> str:
    """The Slurm job that submitit submitted for an API job's run dir."""
    while not list((run_dir / ".submitit").glob("*_submitted.pkl")):
        time.sleep(0.1)
    return next((run_dir / ".submitit").glob("*_submitted.pkl")).name.split("_")[0]


def wait_for_checkpoint(run_dir: Path, newer_than: int = 0, timeout: float = 240) -> int:
    deadline = time.time() + timeout
    while time.time() < deadline:
        steps = [int(path.name[5:]) for path in (run_dir / "checkpoints").glob("step-*")]
        if steps and max(steps) > newer_than:
            return max(steps)
        time.sleep(0.05)
    raise TimeoutError(f"no checkpoint past step {newer_than} in {run_dir}")


def losses(run_dir: Path) -> dict[int, float]:
    with open(run_dir / "results.csv") as handle:
        return {int(row["step"]): float(row["train_loss"]) for row in csv.DictReader(handle)}


def test_an_api_job_runs_as_a_slurm_job_and_cancel_is_scancel(slurm, tmp_path, cache_dir, train_file):
    settings = [*TINY, f"cache_dir={cache_dir}", "train.checkpoint_every=2", *EXECUTOR]
    root = tmp_path / "root"
    with live_server(root, settings) as (url, server):
        client = OpenAI(base_url=url, api_key="x", max_retries=0, timeout=60)
        file_id = client.files.create(file=open(train_file, "rb"), purpose="fine-tune").id
        job = client.fine_tuning.jobs.create(model="gpt-3.5-turbo", training_file=file_id,
                                             hyperparameters={"n_epochs": 1, "batch_size": 8})
        slurm_id = slurm_job_id(root / "jobs" / job.id)
        done = wait_for(client, job.id)
        assert done.status == "succeeded", done.error
        assert slurm_state(slurm_id) == "COMPLETED" and scontrol(slurm_id)["JobName"] == job.id
        messages = [event.message for event in client.fine_tuning.jobs.list_events(job.id, limit=100)]
        assert any(message.startswith("The job has successfully completed") for message in messages)
        checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
        assert [c.step_number for c in checkpoints] == [3]  # one epoch: its end
        assert client.models.retrieve(done.fine_tuned_model).id == done.fine_tuned_model
        assert all(checkpoint.fine_tuned_model_checkpoint.startswith(done.fine_tuned_model + ":ckpt-step-")
                   for checkpoint in checkpoints)

        long = client.fine_tuning.jobs.create(model="gpt-3.5-turbo", training_file=file_id,
                                              hyperparameters={"n_epochs": 50, "batch_size": 1})
        run_dir = root / "jobs" / long.id
        slurm_id = slurm_job_id(run_dir)
        wait_for(client, long.id, ("running",))
        wait_for_checkpoint(run_dir)
        client.fine_tuning.jobs.cancel(long.id)
        assert wait_for(client, long.id).status == "cancelled"
        assert slurm_state(slurm_id) == "CANCELLED"  # scancel, not a signal to a local process
        assert "requeued" not in (run_dir / "events.jsonl").read_text()
        assert json.loads((run_dir / "job.json").read_text())["status"] == "cancelled"


def test_a_sweep_runs_as_slurm_jobs(slurm, tmp_path, cache_dir):
    sweep = tmp_path / "sweep"
    result = subprocess.run([str(BIN / "ftlab"), "train", "-m", *TINY, *LAUNCHER, "train.max_steps=2",
                             "train.learning_rate_multiplier=0.5,2", f"hydra.sweep.dir={sweep}",
                             f"cache_dir={cache_dir}"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    with open(sweep / "summary.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["status"] for row in rows] == ["succeeded", "succeeded"]
    assert "learning_rate_multiplier=0.5" in rows[0]["overrides"] and "learning_rate_multiplier=2" in rows[1]["overrides"]
    tasks = sorted(path.name for path in (sweep / ".submitit").iterdir() if "_" in path.name and path.is_dir())
    assert len(tasks) == 2  # a Slurm job array of two tasks, not two local processes
    for task in tasks:
        assert slurm_state(task) == "COMPLETED"


INTERRUPTIONS = {  # how Slurm stops a running job for it to carry on later
    "requeue": ["scontrol", "requeue"],  # an operator's requeue, or a preemption with PreemptMode=REQUEUE
    "SIGUSR1": ["scancel", "--signal=USR1"],  # the checkpoint signal before the time limit (hydra-submitit's docs)
    "SIGUSR2": ["scancel", "--signal=USR2"],  # submitit's own checkpoint signal
    "SIGTERM": ["scancel", "--signal=TERM"],  # a preemption's first signal, or the time limit's
}


def test_requeued_and_signalled_jobs_resume_to_the_loss_of_an_uninterrupted_one(slurm, tmp_path, cache_dir,
                                                                                 train_file):
    slow = ["backbone.load.hidden_size=256", "backbone.load.num_hidden_layers=4"]  # steps slow enough to catch
    settings = [*TINY, f"cache_dir={cache_dir}", "train.checkpoint_every=3", "lora.dropout=0.0", *slow, *EXECUTOR]
    root = tmp_path / "root"
    hyperparameters = {"n_epochs": 2, "batch_size": 2}  # 24 steps
    with live_server(root, settings) as (url, server):
        client = OpenAI(base_url=url, api_key="x", max_retries=0, timeout=60)
        file_id = client.files.create(file=open(train_file, "rb"), purpose="fine-tune").id
        reference = client.fine_tuning.jobs.create(model="gpt-3.5-turbo", training_file=file_id,
                                                   hyperparameters=hyperparameters)
        assert wait_for(client, reference.id).status == "succeeded"
        expected = losses(root / "jobs" / reference.id)
        for how, command in INTERRUPTIONS.items():
            job = client.fine_tuning.jobs.create(model="gpt-3.5-turbo", training_file=file_id,
                                                 hyperparameters=hyperparameters, suffix=how.lower())
            run_dir = root / "jobs" / job.id
            slurm_id = slurm_job_id(run_dir)
            wait_for_checkpoint(run_dir, newer_than=3)
            subprocess.run([*command, slurm_id], check=True, capture_output=True)
            seen = set()
            while (status := client.fine_tuning.jobs.retrieve(job.id).status) not in TERMINAL:
                seen.add(status)
                time.sleep(0.1)
            assert status == "succeeded", (how, client.fine_tuning.jobs.retrieve(job.id).error)
            events = (run_dir / "events.jsonl").read_text()
            assert "requeued by Slurm" in events and "Resumed from checkpoint" in events, how
            assert "running" in seen and "failed" not in seen, (how, seen)
            got = losses(run_dir)
            assert sorted(got) == sorted(expected), how  # no step lost or repeated
            assert got[max(got)] == pytest.approx(expected[max(expected)], abs=1e-4), how
            assert int(scontrol(slurm_id)["Restarts"]) >= 1, how  # the same Slurm job ran again


def test_a_requeued_sweep_job_resumes_to_the_loss_of_an_uninterrupted_run(slurm, tmp_path, cache_dir, train_file):
    job = [*TINY, "data=custom", f"data.train_file={train_file}", "train.n_epochs=2", "train.batch_size=2",
           "train.checkpoint_every=3", "lora.dropout=0.0", "backbone.load.hidden_size=256",
           "backbone.load.num_hidden_layers=4", f"cache_dir={cache_dir}"]
    plain = subprocess.run([str(BIN / "ftlab"), "train", *job, f"hydra.run.dir={tmp_path / 'plain'}"], cwd=tmp_path,
                           capture_output=True, text=True, timeout=600)
    assert plain.returncode == 0, plain.stdout + plain.stderr
    sweep = tmp_path / "sweep"
    launched = subprocess.Popen([str(BIN / "ftlab"), "train", "-m", *job, *LAUNCHER, "train.learning_rate_multiplier=1",
                                 f"hydra.sweep.dir={sweep}"], cwd=tmp_path, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
    wait_for_checkpoint(sweep / "0", newer_than=3)
    task = next(path.name for path in (sweep / ".submitit").iterdir() if path.name[0].isdigit() and path.is_dir())
    subprocess.run(["scontrol", "requeue", task], check=True, capture_output=True)
    output = launched.communicate(timeout=600)[0]
    assert launched.returncode == 0, output
    with open(sweep / "summary.csv") as handle:
        assert [row["status"] for row in csv.DictReader(handle)] == ["succeeded"]
    events = (sweep / "0" / "events.jsonl").read_text()
    assert "requeued by Slurm" in events and "Resumed from checkpoint" in events
    expected, got = losses(tmp_path / "plain"), losses(sweep / "0")
    assert sorted(got) == sorted(expected)
    assert got[max(got)] == pytest.approx(expected[max(expected)], abs=1e-4)
    assert int(scontrol(task)["Restarts"]) == 1


def test_two_slurm_tasks_train_data_parallel_with_the_losses_of_one_process(slurm, tmp_path, cache_dir):
    train = write_jsonl(tmp_path / "train.jsonl", [chat_example(f"Question {i}?" + " more" * (i % 5), f"Answer {i}")
                                                   for i in range(14)])
    args = ["train", *TINY, "data=custom", f"data.train_file={train}", "train.n_epochs=2", "train.batch_size=4",
            "lora.dropout=0.0", "train.checkpoint_every=3", f"cache_dir={cache_dir}"]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    single = subprocess.run([str(BIN / "ftlab"), *args, f"hydra.run.dir={tmp_path / 'one'}"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stdout + single.stderr
    double = subprocess.run(["srun", "--ntasks=2", "--cpus-per-task=1", "--kill-on-bad-exit=1", str(BIN / "ftlab"),
                             *args, f"hydra.run.dir={tmp_path / 'two'}"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert double.returncode == 0, double.stdout + double.stderr
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(one) == sorted(two) == list(range(1, 9))
    for step in one:
        assert two[step] == pytest.approx(one[step], abs=1e-4), step
    assert json.loads((tmp_path / "two" / "job.json").read_text())["status"] == "succeeded"
    events = [json.loads(line) for line in (tmp_path / "two" / "events.jsonl").read_text().splitlines()]
    assert any(event.get("data", {}).get("world_size") == 2 for event in events)  # two processes, not one


def test_an_api_job_with_two_slurm_tasks_trains_data_parallel(slurm, tmp_path, cache_dir, train_file):
    settings = [*TINY, f"cache_dir={cache_dir}", "lora.dropout=0.0", *EXECUTOR, "executor.tasks_per_node=2"]
    root = tmp_path / "root"
    with live_server(root, settings) as (url, server):
        client = OpenAI(base_url=url, api_key="x", max_retries=0, timeout=60)
        file_id = client.files.create(file=open(train_file, "rb"), purpose="fine-tune").id
        job = wait_for(client, client.fine_tuning.jobs.create(model="gpt-3.5-turbo", training_file=file_id,
                                                              hyperparameters={"n_epochs": 1, "batch_size": 4}).id)
        assert job.status == "succeeded", job.error
    events = [json.loads(line) for line in (root / "jobs" / job.id / "events.jsonl").read_text().splitlines()]
    assert any(event.get("data", {}).get("world_size") == 2 for event in events)  # one process a Slurm task
    assert sorted(losses(root / "jobs" / job.id)) == list(range(1, 7))
