"""Where the server's jobs run (the `executor` config group): each job is one `ftlab train` command.

- `LocalExecutor`: a process on this machine, in its own session, so that it outlives a server
  restart (the next server adopts it) and a crash in it never takes the server down.
- `SubmititExecutor`: a Slurm job through submitit (`cluster: slurm`), or submitit's local
  executor (`cluster: local`), which runs the same path on this machine.

Both return a handle with `done()` and `returncode`; cancelling and pausing signal the process that
holds the run directory's lock (`trainer.run.cancel_job`), which checkpoints and records the outcome.
A local process's handle has its `pid`: the runner hands that process the run dir's lock at once
(`RunLock.hand_to`), and the process waits for it before it touches the job.
"""
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional


def train_command(args: list[str]) -> list[str]:
    """The command line of `ftlab train <args>` with this interpreter."""
    return [sys.executable, "-m", "trainer", "train", *args]


def job_environment() -> dict:
    """The environment a job runs in: this one, offline, without the server's API key."""
    from trainer.run import HANDED_LOCK_ENV

    env = {key: value for key, value in os.environ.items() if key not in ("FTLAB_API_KEY", HANDED_LOCK_ENV)}
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("WANDB_MODE", "offline")
    return env


class ProcessHandle:
    """A job process this server started."""

    def __init__(self, process: subprocess.Popen):
        self.process = process
        self.pid = process.pid

    def done(self) -> bool:
        return self.process.poll() is not None

    @property
    def returncode(self) -> Optional[int]:
        return self.process.poll()

    def terminate(self) -> None:
        """SIGTERM: the job checkpoints and stops (or, still starting, just stops)."""
        if self.process.poll() is None:
            self.process.terminate()


class AdoptedHandle:
    """A job process a previous server started and that still holds its run dir's lock."""

    pid = None  # not ours to hand the lock to: it holds it

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir

    def done(self) -> bool:
        from trainer.run import RunLock

        return RunLock(self.run_dir).holder() is None

    returncode = None

    def terminate(self) -> None:
        from trainer.run import cancel_job

        cancel_job(self.run_dir)


class LocalExecutor:
    """Each job is an `ftlab train` process here; its output goes to `<run dir>/process.log`."""

    def start(self, run_dir: Path, args: list[str]) -> ProcessHandle:
        """Start `ftlab train <args>` for the job in `run_dir`; it waits for the runner to hand it the run dir's lock."""
        from trainer.run import HANDED_LOCK_ENV

        with open(Path(run_dir) / "process.log", "ab") as log:
            process = subprocess.Popen(train_command(args), stdout=log, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, env=job_environment() | {HANDED_LOCK_ENV: "1"},
                                       start_new_session=True)
        return ProcessHandle(process)


def run_train(args: list[str], log_path: str) -> int:
    """What a submitit job runs: `ftlab train <args>`, its output appended to `log_path`; the exit code."""
    with open(log_path, "ab") as log:
        return subprocess.run(train_command(args), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                              env=job_environment()).returncode


class SubmititHandle:
    """A job submitted through submitit (its process, maybe on another node, takes the run dir's lock itself)."""

    pid = None

    def __init__(self, job):
        self.job = job

    def done(self) -> bool:
        return self.job.done()

    @property
    def returncode(self) -> Optional[int]:
        if not self.job.done():
            return None
        try:
            return int(self.job.result())
        except Exception:  # noqa: BLE001 - the job failed outside ftlab (node lost, time limit): no exit code
            return None

    def terminate(self) -> None:
        self.job.cancel(check=False)


class SubmititExecutor:
    """Each job is a submitit job (Slurm, or `cluster: local`); jobs_root must be shared with the nodes."""

    def __init__(self, cluster: str = "slurm", timeout_min: int = 240, gpus_per_node: int = 1, cpus_per_task: int = 8,
                 mem_gb: int = 64, partition: Optional[str] = None):
        self.cluster = cluster
        self.parameters = {"timeout_min": timeout_min, "gpus_per_node": gpus_per_node,
                           "cpus_per_task": cpus_per_task, "mem_gb": mem_gb}
        if partition and cluster == "slurm":
            self.parameters["slurm_partition"] = partition

    def start(self, run_dir: Path, args: list[str]) -> SubmititHandle:
        """Submit `ftlab train <args>` for the job in `run_dir`; submitit's own files go to `<run dir>/.submitit/`."""
        import submitit

        executor = submitit.AutoExecutor(folder=Path(run_dir) / ".submitit", cluster=self.cluster)
        parameters = dict(self.parameters)
        if self.cluster == "local":
            parameters = {"timeout_min": parameters["timeout_min"], "gpus_per_node": 0}
        executor.update_parameters(name=Path(run_dir).name, **parameters)
        return SubmititHandle(executor.submit(run_train, args, str(Path(run_dir) / "process.log")))
