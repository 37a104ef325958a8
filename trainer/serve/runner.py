"""The server's job runner: validate files, queue, start `ftlab train` processes, follow them.

A job moves validating_files → queued → running → succeeded | failed | cancelled, as the hosted
service's do; `paused` after a pause. The runner's threads:

- the validator checks each new job's files (OpenAI's format rules, the 10-example minimum, the
  budget) and moves it to `queued` or fails it with the hosted error code;
- the dispatcher starts queued jobs, oldest first, while fewer than `server.max_running_jobs` run,
  and follows each process to its end. A job whose process died (a crash, an OOM kill, a machine
  that went down) resumes from its newest checkpoint, up to `server.max_job_restarts` times.

Nothing lives only in memory: the queue is the index, the outcome is the run directory. A new
server picks up where the last one stopped: queued jobs stay queued, a job process that outlived
the server is adopted, and one that died with it is resumed.
"""
import logging
import threading
from pathlib import Path
from typing import Optional

from rich.console import Console

from trainer.compose import quote_value
from trainer.request import job_config, read_request
from trainer.run import TERMINAL_STATUSES, EventLog, Job, RunDirLocked, RunLock, cancel_job
from trainer.serve.executors import AdoptedHandle, LocalExecutor

log = logging.getLogger("ftlab.serve")
HOSTED_MIN_EXAMPLES = 10
POLL_SECONDS = 0.5


def format_error_message(report, file_id: str, limit: int = 5) -> str:
    """The hosted-style failure message for a file with format errors: its first bad lines and their codes."""
    errors = report.errors
    listed = "; ".join(f"line {issue.line}: [{issue.code}] {issue.message}" if issue.line is not None
                       else f"[{issue.code}] {issue.message}" for issue in errors[:limit])
    more = f"; and {len(errors) - limit} more" if len(errors) > limit else ""
    return (f"The job failed due to an invalid training file. {file_id} has {len(errors)} format error(s): "
            f"{listed}{more}. Fix the file, upload it again and create a new job.")


class JobRunner:
    """Validation, the FIFO queue and the job processes of one server."""

    def __init__(self, server, executor=None):
        self.server = server
        self.executor = executor or LocalExecutor()
        self.handles: dict[str, object] = {}  # job id → the handle of its running process
        self._wake = threading.Event()  # the dispatcher's
        self._wake_validator = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.RLock()
        self._threads: list[threading.Thread] = []

    # ---- lifecycle -----------------------------------------------------------------------
    def start(self) -> None:
        """Pick up what a previous server left, then start the validator and dispatcher threads."""
        self.recover()
        for name, target in (("validator", self._validate_loop), ("dispatcher", self._dispatch_loop)):
            thread = threading.Thread(target=target, name=f"ftlab-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        """Stop following jobs; their processes keep running and the next server adopts them."""
        self._stop.set()
        self.wake()
        for thread in self._threads:
            thread.join(timeout=10)

    def wake(self) -> None:
        """Look at the queue now rather than at the next poll."""
        self._wake.set()
        self._wake_validator.set()

    def recover(self) -> None:
        """Running jobs of a previous server: adopt a live process (or Slurm job), resume a dead one."""
        index = self.server.index
        for row in index.jobs_in("running"):
            handle = self.executor.adopt(Path(row["run_dir"]))
            if handle is not None:
                self.handles[row["id"]] = handle
                log.info("adopted %s (its process outlived the last server)", row["id"])
            else:
                self._finished(row, returncode=None)

    # ---- validation ------------------------------------------------------------------------
    def _validate_loop(self) -> None:
        while not self._stop.is_set():
            for row in self.server.index.jobs_in("validating_files"):
                if self._stop.is_set():
                    return
                try:
                    self.validate(row)
                except Exception as error:  # noqa: BLE001 - one bad job must not stop the others
                    log.exception("validating %s", row["id"])
                    self._fail(row, "internal_error", f"Validation failed unexpectedly: {type(error).__name__}: "
                               f"{error}")
            self._wake_validator.wait(POLL_SECONDS)
            self._wake_validator.clear()

    def validate(self, row: dict) -> None:
        """Check the job's files as the hosted service does, after creation; queue the job or fail it."""
        from trainer.preflight import data_files, run_estimate, run_validate

        run_dir = Path(row["run_dir"])
        events = EventLog(run_dir / "events.jsonl")
        cfg = job_config(row["request"]["overrides"], read_request(run_dir))
        events.add(f"Validating training file: {row['training_file']}"
                   + (f" and validation file: {row['validation_file']}" if row["validation_file"] else ""))
        files = data_files(cfg)
        console = Console(quiet=True)
        report = run_validate(cfg, run_dir, console, files)
        if report.errors:
            bad = report.errors[0]
            kind = "validation" if "valid" in str(bad.file) and row["validation_file"] else "training"
            file_id = row["validation_file"] if kind == "validation" else row["training_file"]
            message = format_error_message(report, file_id)
            if kind == "validation":
                message = message.replace("invalid training file", "invalid validation file")
            return self._fail(row, f"invalid_{kind}_file", message, param=f"{kind}_file")
        n_examples = report.file("train").n_valid
        if n_examples < HOSTED_MIN_EXAMPLES:
            return self._fail(row, "invalid_n_examples", f"Training file has {n_examples} example(s), but must have "
                              f"at least {HOSTED_MIN_EXAMPLES} examples", param="training_file")
        estimate = run_estimate(cfg, run_dir, console, report=report, files=files)
        if estimate["over_budget"]:
            return self._fail(row, "over_budget", f"Estimated training cost ${estimate['training_cost_usd']:.4f} is "
                              f"over train.max_cost_usd=${estimate['max_cost_usd']}")
        if self.server.index.move_job(row["id"], ("validating_files",), "queued"):
            Job.load(run_dir).update(status="queued")
            events.add("Files validated, moving job to queued state")
            self.wake()

    # ---- the queue -------------------------------------------------------------------------
    def _dispatch_loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.dispatch()
            except Exception:  # noqa: BLE001 - keep following the other jobs
                log.exception("dispatching jobs")
            self._wake.wait(POLL_SECONDS)
            self._wake.clear()

    def dispatch(self) -> None:
        """Reap finished processes, then start queued jobs while there is room."""
        index = self.server.index
        with self._lock:
            for job_id, handle in list(self.handles.items()):
                if handle.done():
                    del self.handles[job_id]
                    row = index.job(job_id)
                    if row is not None:
                        self._finished(row, handle.returncode)
            for row in index.jobs_in("queued"):
                if len(self.handles) >= max(1, int(self.server.cfg.server.max_running_jobs)):
                    break
                self._launch(row)

    def _launch(self, row: dict) -> None:
        """Start the job's process, or adopt the one already training it (a server that died mid-launch)."""
        run_dir = Path(row["run_dir"])
        if RunLock(run_dir).holder():
            self.handles[row["id"]] = AdoptedHandle(run_dir)
            self.server.index.move_job(row["id"], ("queued",), "running")
            log.info("adopted %s (launched by the last server, which stopped before recording it)", row["id"])
            return
        job = Job.load(run_dir)
        # never trained (no process got as far as env.json): start it; else continue from its checkpoint
        fresh = job.record.get("status") == "queued" and not (run_dir / "env.json").is_file()
        args = (list(row["request"]["overrides"]) + [f"hydra.run.dir={quote_value(str(run_dir))}"] if fresh
                else [f"resume={run_dir}"])  # taken verbatim by `ftlab train`, not parsed by Hydra
        if not fresh:
            job.update(status="queued")  # until the process marks it running
        try:
            handle = self.executor.start(run_dir, args)
        except Exception as error:  # noqa: BLE001 - e.g. sbatch refusing the job's resources: the job fails saying why
            log.exception("starting %s", row["id"])
            return self._fail(row, "job_submission_failed", f"The job could not be started: {type(error).__name__}: "
                              f"{str(error).strip()[:2000]}. Check the `executor` settings (partition, GPUs, memory)")
        if handle.pid is not None:
            try:
                RunLock(run_dir).hand_to(handle.pid)  # before anything else: the job is never unlocked while it runs
            except RunDirLocked:
                handle.terminate()  # someone else took the run dir meanwhile; this process never touched it
                raise
        self.handles[row["id"]] = handle
        self.server.index.move_job(row["id"], ("queued",), "running")
        log.info("started %s (%s)", row["id"], "new" if fresh else "resumed")

    def _finished(self, row: dict, returncode: Optional[int]) -> None:
        """A job's process has ended: record what the job became."""
        index, run_dir = self.server.index, Path(row["run_dir"])
        job = Job.load(run_dir)
        status = job.record.get("status")
        events = EventLog(run_dir / "events.jsonl")
        wanted = row.get("wanted")
        if wanted == "pause" and status not in ("succeeded", "failed"):
            job.update(status="paused", finished_at=None, error=None)
            events.add("Fine-tuning job paused; resume it to continue from its newest checkpoint")
            index.move_job(row["id"], ("running",), "paused", wanted=None)
        elif wanted == "cancel" and status not in TERMINAL_STATUSES:
            job.finish("cancelled")
            events.add("Fine-tuning job cancelled", level="warn")
            index.move_job(row["id"], ("running",), "done", wanted=None)
        elif status in TERMINAL_STATUSES:
            if status == "succeeded":
                self.publish_results(row["id"])
            index.move_job(row["id"], ("running",), "done", wanted=None)
        elif row["restarts"] < int(self.server.cfg.server.max_job_restarts):
            events.add(f"The job's process ended unexpectedly (exit code {returncode}); resuming from its newest "
                       f"checkpoint (restart {row['restarts'] + 1} of {self.server.cfg.server.max_job_restarts})",
                       level="warn")
            index.move_job(row["id"], ("running",), "queued", restarts=row["restarts"] + 1)
        else:
            self._fail(row, "job_process_died", f"The job's process ended unexpectedly {row['restarts'] + 1} times "
                       f"(last exit code {returncode}); its output is in process.log in the job's run directory")
        self.wake()

    def publish_results(self, job_id: str) -> list[str]:
        """The result files of a succeeded job (its results CSV as a `fine-tune-results` file), made once."""
        from trainer.serve.files_api import new_file_id

        index = self.server.index
        with self._lock:
            published = index.job_result_files(job_id)
            row = index.job(job_id)
            results = Path(row["run_dir"]) / "results.csv"
            if not published and results.is_file():
                file_id = new_file_id()
                index.add_file(file_id=file_id, purpose="fine-tune-results", filename="step_metrics.csv",
                               size=results.stat().st_size, path=results)
                index.link_file(job_id, file_id)
                published = [file_id]
        return published

    def _fail(self, row: dict, code: str, message: str, param: Optional[str] = None) -> None:
        run_dir = Path(row["run_dir"])
        job = Job.load(run_dir)
        job.finish("failed", error={"code": code, "message": message, "param": param})
        EventLog(run_dir / "events.jsonl").add(f"Job failed: [{code}] {message}", level="error")
        self.server.index.set_job(row["id"], state="done", wanted=None)

    # ---- what clients ask for ------------------------------------------------------------
    def cancel(self, job_id: str) -> None:
        """Cancel a job: one not started yet at once; a running one checkpoints and stops."""
        index = self.server.index
        with self._lock:
            row = index.job(job_id)
            if row["state"] in ("validating_files", "queued", "paused"):
                if index.move_job(job_id, (row["state"],), "done", wanted=None):
                    job = Job.load(Path(row["run_dir"]))
                    job.finish("cancelled")
                    EventLog(Path(row["run_dir"]) / "events.jsonl").add("Fine-tuning job cancelled", level="warn")
            elif row["state"] == "running":
                index.set_job(job_id, wanted="cancel")
                self._signal(job_id, Path(row["run_dir"]))
        self.wake()

    def pause(self, job_id: str) -> None:
        """Pause a running job: it writes a checkpoint and stops; `resume` continues from it."""
        index = self.server.index
        with self._lock:
            row = index.job(job_id)
            if row["state"] == "queued":
                index.move_job(job_id, ("queued",), "paused")
                Job.load(Path(row["run_dir"])).update(status="paused")
            elif row["state"] == "running":
                index.set_job(job_id, wanted="pause")
                self._signal(job_id, Path(row["run_dir"]))
        self.wake()

    def _signal(self, job_id: str, run_dir: Path) -> None:
        """Stop the job's process the executor's way (SIGTERM, `scancel`): it checkpoints, then stops."""
        if job_id in self.handles:
            self.handles[job_id].terminate()
        else:
            cancel_job(run_dir)

    def resume(self, job_id: str) -> None:
        """Put a paused job back in the queue; it continues from its newest checkpoint."""
        with self._lock:
            row = self.server.index.job(job_id)
            if self.server.index.move_job(job_id, ("paused",), "queued"):
                job = Job.load(Path(row["run_dir"]))
                job.update(status="queued")
                EventLog(Path(row["run_dir"]) / "events.jsonl").add("Fine-tuning job resumed: queued")
        self.wake()


