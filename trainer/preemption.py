"""Stopping a training process on a signal, and carrying on when Slurm runs the job again.

Signals stop a job cleanly: SIGTERM (`ftlab jobs cancel`, a server's cancel or pause, Slurm's
`scancel`, a requeue, a preemption, the time limit) and, in a Slurm job, SIGUSR1 and SIGUSR2:
submitit's checkpoint signal, which Slurm sends `signal_delay_s` before the time limit (USR2 in
submitit ≥ 1.4, USR1 before, and in hydra-submitit-launcher's docs). While the job starts up it
stops at once; once it trains, at the end of the step under way, so that the checkpoint it writes
holds exactly the steps taken and a resumed run ends with the loss of one that never stopped.

What a stop means is Slurm's to say. A requeue (`scontrol requeue`, a preemption with
PreemptMode=REQUEUE) counts the job's restart before it sends SIGTERM, so `scontrol show job`
shows more restarts than this run's SLURM_RESTART_COUNT; submitit's checkpoint signal is followed
by submitit's own requeue. Such a job stays `queued` (not cancelled) until Slurm runs it again, and
the same command then resumes it: in a restarted Slurm job, a run dir that has started training
continues from its newest checkpoint.
"""
import contextlib
import os
import re
import signal
import subprocess
from pathlib import Path
from typing import Optional

REQUEUED_EXIT = 75  # EX_TEMPFAIL: the job stopped with a checkpoint and Slurm runs it again
CHECKPOINT_SIGNALS = ("SIGUSR1", "SIGUSR2")


class JobCancelled(Exception):
    """Raised by a stop signal (and stands in for Ctrl-C) to stop a job cleanly."""


class StopSignals:
    """The signals that stop a job, between `install` and `restore`; `received` names the first that came."""

    def __init__(self):
        self.received: str | None = None
        self.previous: dict[int, object] = {}
        self._at_step_end = False

    def install(self) -> "StopSignals":
        """Handle SIGTERM (and in a Slurm job SIGUSR1 and SIGUSR2) from now on, until `restore`."""
        numbers = [signal.SIGTERM] + ([signal.SIGUSR1, signal.SIGUSR2] if "SLURM_JOB_ID" in os.environ else [])
        for number in numbers:
            self.previous[number] = signal.signal(number, self._handle)
        return self

    def restore(self) -> None:
        """Put back the handlers `install` replaced."""
        for number, handler in self.previous.items():
            signal.signal(number, handler)

    def _handle(self, signum, frame) -> None:
        self.received = self.received or signal.Signals(signum).name
        if not self._at_step_end:
            raise JobCancelled(f"received signal {self.received}")

    @contextlib.contextmanager
    def at_step_end(self):
        """Within this block a signal stops the job only when `check` is called, at the end of a step."""
        self._at_step_end = True
        try:
            yield
        finally:
            self._at_step_end = False

    def check(self, agree=None) -> None:
        """Raise JobCancelled if a stop signal came. `agree(flag) -> flag` makes every rank of a process group stop
        at the same step (each receives the signal at its own moment)."""
        stop = self.received is not None
        if agree is not None:
            stop = agree(stop)
        if stop:
            raise JobCancelled(f"received signal {self.received or 'on another rank'}")

    def pass_on(self) -> None:
        """After the job's checkpoint, hand submitit's checkpoint signal to the handler this process had before:
        in the process of a sweep's Slurm job that is submitit's, which requeues the job and ends the process.
        (A job process of `ftlab serve` has none: its parent, a submitit task, gets the signal itself.)"""
        if self.received not in CHECKPOINT_SIGNALS:
            return
        for number in (signal.SIGUSR1, signal.SIGUSR2):
            handler = self.previous.get(number)
            if callable(handler):
                handler(number, None)
                return


def restart_count() -> int:
    """How many times Slurm has requeued the job this process runs in (0 outside Slurm)."""
    return int(os.environ.get("SLURM_RESTART_COUNT") or 0)


def resumes_after_requeue(run_dir: Path) -> bool:
    """Whether this run continues its run dir's job: a Slurm job run again after a requeue, whose job had started
    training (env.json is written just before the model loads) in an earlier run of the same command."""
    return restart_count() > 0 and (Path(run_dir) / "env.json").is_file()


def slurm_runs_it_again(signal_name: str | None) -> bool:
    """Whether this job stopped to run again, so it is left `queued` rather than cancelled: a requeue Slurm has
    counted (`scontrol requeue`, a preemption), or, in a job submitit started, submitit's checkpoint signal or a
    SIGTERM while Slurm still runs the job (submitit's preemption sends it before its checkpoint signal; submitit
    requeues the job once the checkpoint is written). A SIGTERM that ends the job (`scancel`, the time limit) is a
    cancel."""
    if "SLURM_JOB_ID" not in os.environ or signal_name is None:
        return False
    state, restarts = slurm_job(os.environ["SLURM_JOB_ID"])
    if restarts > restart_count():
        return True
    by_submitit = os.environ.get("SUBMITIT_EXECUTOR") == "slurm"
    return by_submitit and (signal_name in CHECKPOINT_SIGNALS or state == "RUNNING")


def requeue_unless_under_way() -> None:
    """Have Slurm run this job again after its checkpoint, unless a requeue is already under way: one Slurm counted
    (`scontrol requeue`, a preemption with PreemptMode=REQUEUE) or one submitit makes after its checkpoint signal.
    What is left is a SIGTERM that stops a job submitit started while Slurm still runs it (a preemption's or an
    operator's signal): `scontrol requeue`, as submitit does after its own signal."""
    job_id = os.environ.get("SLURM_JOB_ID")
    if job_id is None:
        return
    state, restarts = slurm_job(job_id)
    if state == "RUNNING" and restarts == restart_count():
        subprocess.run(["scontrol", "requeue", job_id], capture_output=True, timeout=30)


def slurm_job(job_id: str) -> tuple[Optional[str], int]:
    """The job's state (PENDING, RUNNING, REQUEUED, COMPLETED, …) and its count of requeues so far, as `scontrol show
    job` gives them: state "" once slurmctld has forgotten the job (MinJobAge after it ended), None when slurmctld
    cannot be asked just now; restarts -1 when unknown."""
    try:
        shown = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None, -1
    if shown.returncode != 0:
        return ("" if "Invalid job id" in shown.stderr else None), -1
    state, restarts = re.search(r"\bJobState=(\w+)", shown.stdout), re.search(r"\bRestarts=(\d+)", shown.stdout)
    return (state.group(1) if state else None), (int(restarts.group(1)) if restarts else -1)
