"""Where the server's jobs run (the `executor` config group): each job is one `ftlab train` command.

- `LocalExecutor`: a process on this machine, in its own session, so that it outlives a server
  restart (the next server adopts it) and a crash in it never takes the server down.
- `SubmititExecutor`: a Slurm job through submitit (`cluster: slurm`), or submitit's local
  executor (`cluster: local`), which runs the same path on this machine.

Both return a handle with `done()`, `returncode` and `terminate()`: cancelling and pausing stop the
job that way (SIGTERM to the process, `scancel` on Slurm); the process checkpoints and records the
outcome. A local process's handle has its `pid`: the runner hands that process the run dir's lock at
once (`RunLock.hand_to`), and the process waits for it before it touches the job. `adopt` finds what
a previous server left running: a process holding the run dir, or a Slurm job still pending or running.
"""
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Optional


def train_command(args: list[str]) -> list[str]:
    """The command line of `ftlab train <args>` with this interpreter."""
    return [sys.executable, "-m", "trainer", "train", *args]


def job_environment() -> dict:
    """The environment a job runs in: this one, offline, without the server's API key or its OpenMP settings."""
    from trainer import openmp
    from trainer.run import HANDED_LOCK_ENV

    left_out = {"FTLAB_API_KEY", HANDED_LOCK_ENV, *openmp.set_here}
    env = {key: value for key, value in os.environ.items() if key not in left_out}
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


def adopt_process(run_dir: Path) -> Optional[AdoptedHandle]:
    """An AdoptedHandle for the live process that holds `run_dir`'s lock; None when none does."""
    from trainer.run import RunLock

    return AdoptedHandle(run_dir) if RunLock(run_dir).holder() else None


class LocalExecutor:
    """Each job is an `ftlab train` process here; its output goes to `<run dir>/process.log`."""

    def adopt(self, run_dir: Path) -> Optional[AdoptedHandle]:
        """The handle of a process a previous server started that still holds the run dir, if there is one."""
        return adopt_process(run_dir)

    def start(self, run_dir: Path, args: list[str]) -> ProcessHandle:
        """Start `ftlab train <args>` for the job in `run_dir`; it waits for the runner to hand it the run dir's lock."""
        from trainer.run import HANDED_LOCK_ENV

        with open(Path(run_dir) / "process.log", "ab") as log:
            process = subprocess.Popen(train_command(args), stdout=log, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, env=job_environment() | {HANDED_LOCK_ENV: "1"},
                                       start_new_session=True)
        return ProcessHandle(process)


class TrainingTask:
    """What a submitit job of `ftlab serve` runs: `ftlab train <args>` as a child process, its output appended to the
    run dir's process.log; the exit code.

    submitit's checkpoint-and-requeue protocol, as `submitit.helpers.Checkpointable` defines it: on the checkpoint
    signal Slurm sends before the time limit, submitit calls `checkpoint()`, which has the child write its checkpoint
    and stop, and returns this task to run again; submitit then requeues the Slurm job. A requeue from outside
    (`scontrol requeue`, a preemption) sends SIGTERM to every process of the job instead: the child checkpoints,
    sees the requeue, and exits with REQUEUED_EXIT, and the task ends without a result. A SIGTERM alone (a preemption's
    first signal, an operator's) stops the child the same way, and the task requeues the job itself (`scontrol
    requeue`), as submitit does after its checkpoint signal. Either way the job is the
    same Slurm job when it runs again, so the server keeps following it, and the same command resumes the run dir's
    job from its newest checkpoint (trainer/preemption.py).
    """

    def __init__(self, args: list[str], run_dir: str):
        self.args = list(args)
        self.run_dir = str(run_dir)
        self._process: Optional[subprocess.Popen] = None
        self._waiter: Optional[threading.Thread] = None

    def __getstate__(self) -> dict:
        return {"args": self.args, "run_dir": self.run_dir, "_process": None, "_waiter": None}

    def __call__(self) -> int:
        from trainer.preemption import REQUEUED_EXIT, requeue_unless_under_way

        _both_checkpoint_signals_to_submitit()
        with open(Path(self.run_dir) / "process.log", "ab") as log:
            self._process = subprocess.Popen(train_command(self.args), stdout=log, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL, env=job_environment())
        # waited for in a thread: checkpoint() runs in a signal handler of this thread and waits for the same child
        self._waiter = threading.Thread(target=self._process.wait, daemon=True)
        self._waiter.start()
        while self._waiter.is_alive():
            self._waiter.join(0.5)
        if self._process.returncode == REQUEUED_EXIT:
            requeue_unless_under_way()
            raise SystemExit(REQUEUED_EXIT)  # Slurm runs the job again: submitit must record no result for this run
        return self._process.returncode

    def checkpoint(self, *args, **kwargs):
        """submitit's checkpoint signal: the child writes its checkpoint and stops; the task to run when Slurm runs
        the job again (the same command: it resumes)."""
        import submitit

        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(signal.SIGUSR2)  # Slurm signalled it too, unless it signalled the batch shell only
            self._waiter.join()
        return submitit.helpers.DelayedSubmission(TrainingTask(self.args, self.run_dir))


def _both_checkpoint_signals_to_submitit() -> None:
    """submitit listens for one checkpoint signal (USR2, or $SUBMITIT_PREEMPT_SIGNAL); Slurm may be set to send USR1
    (older submitit, hydra-submitit-launcher's docs): both go to submitit's handler, neither ends the task."""
    import submitit

    handler = signal.getsignal(submitit.JobEnvironment._usr_sig())
    if callable(handler):
        for number in (signal.SIGUSR1, signal.SIGUSR2):
            signal.signal(number, handler)


# Slurm's states of a job that is over; any other (PENDING, RUNNING, REQUEUED, COMPLETING, …) may still train. PREEMPTED
# is left out: a job preempted to be requeued passes through it; one preempted for good is over once Slurm forgets it.
SLURM_FINISHED = {"COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
                  "SPECIAL_EXIT", "REVOKED"}


class SubmititHandle:
    """A job submitted through submitit (its process, maybe on another node, takes the run dir's lock itself).

    On Slurm the job is over when Slurm says so (`scontrol`; submitit's sacct needs an accounting database). A
    requeued job is still the same job, pending or running again, so a requeue is never an ended process (nor a
    restart counted against `server.max_job_restarts`)."""

    pid = None

    def __init__(self, job, run_dir: Path, cluster: str):
        self.job = job
        self.run_dir = Path(run_dir)
        self.cluster = cluster

    def done(self) -> bool:
        if self.cluster != "slurm":
            return self.job.done()
        from trainer.preemption import slurm_job

        state, _ = slurm_job(self.job.job_id)
        return state is not None and (state == "" or state in SLURM_FINISHED)

    @property
    def returncode(self) -> Optional[int]:
        """The exit code of `ftlab train`, once the job has ended with one; None when it ended outside ftlab (node lost,
        time limit) or has not ended."""
        from submitit.core.utils import pickle_load

        result_file = self.job.paths.result_pickle
        if not result_file.exists():
            return None
        try:
            outcome, value = pickle_load(result_file)
        except Exception:  # noqa: BLE001 - a result file cut short: no exit code
            return None
        return int(value) if outcome == "success" else None

    def terminate(self) -> None:
        """Stop the job: `scancel` on Slurm (SIGTERM to its processes, which checkpoint); on submitit's local
        executor, SIGTERM to the process that holds the run dir (submitit's own cancel would kill it outright)."""
        from trainer.run import cancel_job

        if self.cluster == "slurm" or cancel_job(self.run_dir) is None:
            self.job.cancel(check=False)


class SubmititExecutor:
    """Each job is a submitit job (Slurm, or `cluster: local`); jobs_root must be shared with the nodes.

    Every setting is conf/executor/slurm.yaml's; `gpus_per_node: 0` and `mem_gb: null` request none (a CPU node,
    the partition's default memory)."""

    def __init__(self, cluster: str = "slurm", timeout_min: int = 240, partition: Optional[str] = None,
                 account: Optional[str] = None, nodes: int = 1, tasks_per_node: int = 1, gpus_per_node: int = 1,
                 cpus_per_task: int = 8, mem_gb: Optional[float] = 64, signal_delay_s: int = 120,
                 max_num_timeout: int = 3, additional_parameters: Optional[dict] = None,
                 setup: Optional[list] = None):
        self.cluster = cluster
        self.max_num_timeout = max_num_timeout
        parameters = {"timeout_min": timeout_min, "nodes": nodes, "tasks_per_node": tasks_per_node,
                      "cpus_per_task": cpus_per_task, "gpus_per_node": gpus_per_node or None, "mem_gb": mem_gb,
                      "slurm_partition": partition, "slurm_account": account, "slurm_signal_delay_s": signal_delay_s,
                      "slurm_additional_parameters": dict(additional_parameters or {}) or None,
                      "slurm_setup": list(setup or []) or None}
        if cluster == "local":  # this machine: no GPUs asked for, no Slurm settings
            parameters = {"timeout_min": timeout_min, "gpus_per_node": 0}
        self.parameters = {key: value for key, value in parameters.items() if value is not None}

    def start(self, run_dir: Path, args: list[str]) -> SubmititHandle:
        """Submit `ftlab train <args>` for the job in `run_dir`; submitit's own files go to `<run dir>/.submitit/`."""
        executor = self._executor(run_dir)
        executor.update_parameters(name=Path(run_dir).name, **self.parameters)
        return SubmititHandle(executor.submit(TrainingTask(args, str(run_dir))), run_dir, self.cluster)

    def adopt(self, run_dir: Path):
        """The handle of the job a previous server submitted for `run_dir`, if it may still train: a Slurm job pending
        or running (after a requeue its process holds no lock), else a process holding the run dir."""
        import submitit

        submitted = sorted(Path(run_dir, ".submitit").glob("*_submitted.pkl"), key=lambda path: path.stat().st_mtime)
        if self.cluster == "slurm" and submitted:
            job = submitit.SlurmJob(folder=Path(run_dir) / ".submitit", job_id=submitted[-1].name.split("_")[0])
            handle = SubmititHandle(job, run_dir, self.cluster)
            if not handle.done():
                return handle
        return adopt_process(run_dir)

    def _executor(self, run_dir: Path):
        import submitit

        folder = Path(run_dir) / ".submitit"
        if self.cluster == "slurm":
            return submitit.AutoExecutor(folder=folder, cluster="slurm", slurm_max_num_timeout=self.max_num_timeout)
        return submitit.AutoExecutor(folder=folder, cluster=self.cluster)
