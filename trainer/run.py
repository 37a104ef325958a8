"""The run directory is the job record: job.json, events.jsonl, results.csv, env.json.

Every file is written atomically (temp file + rename), so a killed run never leaves a
half-written record; events.jsonl and results.csv only ever grow by whole lines.
"""
import csv
import io
import json
import os
import platform
import secrets
import subprocess
import time
from importlib import metadata
from pathlib import Path

from trainer.files import atomic_writer, sha256_of, write_atomic, write_json

# set (to "1") in the environment of a job process whose launcher hands it the run dir's lock (RunLock.hand_to)
HANDED_LOCK_ENV = "FTLAB_RUN_LOCK_HANDED"
RESULT_COLUMNS = ["step", "train_loss", "train_accuracy", "valid_loss", "valid_mean_token_accuracy"]
TERMINAL_STATUSES = ("succeeded", "failed", "cancelled")
SECRET_MARKERS = ("KEY", "TOKEN", "SECRET", "PASSWORD")


def new_job_id() -> str:
    """A job id shaped like the hosted API's: ftjob- and 24 random alphanumerics."""
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    return "ftjob-" + "".join(secrets.choice(alphabet) for _ in range(24))


def fine_tuned_model_name(model: str, org: str, suffix: str | None, job_id: str) -> str:
    """`ft:<model>:<org>:<suffix>:<id>`, the id being the job id's first 8 characters after `ftjob-`."""
    return f"ft:{model}:{org}:{suffix or ''}:{job_id.removeprefix('ftjob-')[:8]}"


class Job:
    """A fine-tuning job, shaped like OpenAI's `fine_tuning.job`, kept in `<run_dir>/job.json`."""

    def __init__(self, run_dir: Path, record: dict):
        self.run_dir = run_dir
        self.record = record

    @classmethod
    def create(cls, run_dir: Path, *, model: str, org: str, suffix: str | None, training_file: Path,
               validation_file: Path | None, backbone: str, seed: int, job_id: str | None = None,
               **fields) -> "Job":
        """A new job in status `validating_files`, saved at once; `fields` add to the record (the server's
        file ids, metadata, integrations, method)."""
        job_id = job_id or new_job_id()
        record = {
            "object": "fine_tuning.job",
            "id": job_id,
            "model": model,
            "backbone": backbone,
            "created_at": int(time.time()),
            "finished_at": None,
            "fine_tuned_model": None,
            "organization_id": org,
            "suffix": suffix,
            "status": "validating_files",
            "hyperparameters": {},
            "training_file": _file_record(training_file),
            "validation_file": _file_record(validation_file) if validation_file else None,
            "trained_tokens": None,
            "result_files": [],
            "seed": seed,
            "error": None,
            "run_dir": str(run_dir.resolve()),
        } | fields
        job = cls(run_dir, record)
        job.save()
        return job

    @classmethod
    def load(cls, run_dir: Path) -> "Job":
        return cls(run_dir, json.loads((run_dir / "job.json").read_text()))

    @property
    def id(self) -> str:
        return self.record["id"]

    def save(self) -> None:
        write_json(self.run_dir / "job.json", self.record)

    def update(self, **fields) -> None:
        self.record.update(fields)
        self.save()

    def finish(self, status: str, *, error: dict | None = None, **fields) -> None:
        """Move to a terminal status (succeeded | failed | cancelled) and stamp `finished_at`."""
        assert status in TERMINAL_STATUSES, status
        self.update(status=status, error=error, finished_at=int(time.time()), **fields)


def _file_record(path: Path) -> dict:
    return {"path": str(path), "sha256": sha256_of(path), "bytes": path.stat().st_size}


class EventLog:
    """`events.jsonl`: one JSON object a line, like the hosted API's job events."""

    def __init__(self, path: Path):
        self.path = path

    def add(self, message: str, *, level: str = "info", type: str = "message", data: dict | None = None) -> None:
        event = {
            "object": "fine_tuning.job.event",
            "created_at": time.time(),
            "level": level,
            "message": message,
            "type": type,
            "data": data or {},
        }
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(event) + "\n")
            handle.flush()

    def drop_metrics_after(self, step: int) -> None:
        """Forget metrics events past `step` (a resumed run trains those steps again), atomically."""
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue  # a line cut off by a kill
            if event.get("type") == "metrics" and event.get("data", {}).get("step", 0) > step:
                continue
            kept.append(line + "\n")
        write_atomic(self.path, "".join(kept))


class ResultsTable:
    """`results.csv` (step, train_loss, train_accuracy, valid_loss, valid_mean_token_accuracy), or another table
    of per-step metrics with `columns` (step first, then one that every row has: a method's own, such as DPO's).

    Each step appends one line (O(1), like events.jsonl); the file is rewritten atomically only
    when this process first writes it and when a resume drops the rows past its checkpoint.
    Rewriting every step cost O(steps): 7 ms a step by step 5,000.
    """

    def __init__(self, path: Path, columns: list[str] = RESULT_COLUMNS):
        self.path = path
        self.columns = list(columns)
        self.rows: list[dict] = []
        self._appending = False  # whether the file on disk holds exactly self.rows

    def load(self, until_step: int) -> None:
        """Read back the rows up to `until_step` (a resumed run appends after them); drop the rest on disk."""
        self.rows = []
        if self.path.exists():
            with open(self.path, encoding="utf-8", newline="") as handle:
                for row in csv.DictReader(handle):
                    try:
                        parsed = {column: float(row[column]) if row[column] not in ("", None) else ""
                                  for column in self.columns[1:]} | {"step": int(row["step"])}
                    except (KeyError, TypeError, ValueError):
                        continue  # a line cut short by a crash
                    in_order = not self.rows or parsed["step"] > self.rows[-1]["step"]
                    if in_order and parsed[self.columns[1]] != "" and parsed["step"] <= until_step:
                        self.rows.append({column: parsed[column] for column in self.columns})
        self._rewrite()

    def add(self, row: dict) -> None:
        self.rows.append({column: row.get(column, "") for column in self.columns})
        if not self._appending:
            self._rewrite()  # a fresh run dir, or one whose old rows this run replaces
            return
        with open(self.path, "a", encoding="utf-8", newline="") as handle:  # one short write: whole lines only
            csv.DictWriter(handle, fieldnames=self.columns, lineterminator="\n").writerow(self.rows[-1])

    def _rewrite(self) -> None:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=self.columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.rows)
        write_atomic(self.path, buffer.getvalue())
        self._appending = True


def describe_environment(seed: int, data_files: dict[str, Path]) -> dict:
    """Package versions, git commit, hardware, seed and data hashes: what reproducing a run needs."""
    import torch

    packages = ["ftlab", "torch", "transformers", "peft", "accelerate", "bitsandbytes", "hydra-core",
                "omegaconf", "tiktoken", "wandb"]
    versions = {}
    for name in packages:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "packages": versions,
        "python": platform.python_version(),
        "git_commit": _git_commit(),
        "hardware": {
            "platform": platform.platform(),
            "machine": platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.is_available(),
            "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        },
        "seed": seed,
        "data": {name: {"path": str(path), "sha256": sha256_of(path)} for name, path in data_files.items()},
        "environment": {k: v for k, v in os.environ.items() if k.startswith(("HF_", "WANDB_", "CUDA_", "OMP_"))
                        and not any(marker in k.upper() for marker in SECRET_MARKERS)},
    }


def _git_commit() -> str | None:
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                                text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() or None


class RunDirLocked(RuntimeError):
    """Another live process is training in this run directory."""

    code = "run_dir_locked"


class RunLock:
    """`<run_dir>/.lock`: the process training there ({pid, host, started, pid_start}). A lock whose process is
    gone is stale and cleared.

    A process `ftlab serve` launches does not take the lock itself: the server hands it over (`hand_to`)
    as soon as the process exists, and the process waits for it (`acquire(handed=True)`). So there is
    no moment when a job's process runs without the lock naming it: a server killed right after a
    launch leaves either a lock the next server adopts, or a process that never gets the lock and
    ends without touching the run dir, while the next server launches the job again.
    """

    HANDOVER_SECONDS = 60  # how long a launched process waits for its server to hand it the lock

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / ".lock"

    def holder(self) -> dict | None:
        """The live lock holder ({pid, host, started}), or None when unlocked or stale."""
        try:
            holder = json.loads(self.path.read_text())
            pid = int(holder.get("pid", -1))
        except (OSError, ValueError, TypeError, AttributeError):
            return None
        if holder.get("host") != platform.node():
            return holder  # another machine's process (a shared jobs root): cannot be checked from here
        if _pid_alive(pid) and holder.get("pid_start") in (None, _process_start(pid)):  # not a reused pid
            return holder
        return None

    def acquire(self, handed: bool = False) -> None:
        """Take the lock for this process, or raise RunDirLocked naming the holder; a stale lock is cleared.
        `handed`: wait for the server that launched this process to hand the lock over instead."""
        if handed:
            return self._wait_for_handover()
        if not self._create(os.getpid()):
            raise RunDirLocked(self._refusal(self.holder()))

    def hand_to(self, pid: int) -> None:
        """Take the lock on behalf of process `pid` (one this process just started); RunDirLocked if it is held."""
        if not self._create(pid):
            raise RunDirLocked(self._refusal(self.holder()))

    def _create(self, pid: int) -> bool:
        """Write the lock naming `pid` if it is free (clearing a stale one); whether it now names `pid`.
        The record is written whole before it appears under its name (link fails if the name exists)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        record = {"pid": pid, "host": platform.node(), "started": time.time(), "pid_start": _process_start(pid)}
        for _ in range(3):
            with atomic_writer(self.path.with_name(f".lock.{pid}.new")) as handle:
                json.dump(record, handle)
            staged = self.path.with_name(f".lock.{pid}.new")
            try:
                os.link(staged, self.path)
                return True
            except FileExistsError:
                holder = self.holder()
                if holder:
                    return holder.get("pid") == pid and holder.get("host") == platform.node()
                self.path.unlink(missing_ok=True)  # stale: its process is gone
            finally:
                staged.unlink(missing_ok=True)
        return False

    def _wait_for_handover(self) -> None:
        deadline = time.time() + self.HANDOVER_SECONDS
        while True:
            holder = self.holder()
            if holder and holder.get("pid") == os.getpid() and holder.get("host") == platform.node():
                return
            if holder:
                raise RunDirLocked(self._refusal(holder))
            if time.time() > deadline:
                raise RunDirLocked(f"{self.path.parent}: the server that launched this process did not hand it the "
                                   f"run dir's lock within {self.HANDOVER_SECONDS} s; the next server launches the job")
            time.sleep(0.05)

    def _refusal(self, holder: dict | None) -> str:
        if not holder:
            return f"could not lock {self.path.parent}"
        return (f"{self.path.parent} is in use by pid {holder['pid']} on {holder['host']} (started "
                f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(holder.get('started', 0)))}); "
                f"wait for it, cancel it with `ftlab jobs cancel <job id>`, or use another hydra.run.dir")

    def release(self) -> None:
        try:
            if json.loads(self.path.read_text()).get("pid") == os.getpid():
                self.path.unlink()
        except (OSError, ValueError):
            pass


def _process_start(pid: int) -> int | None:
    """When process `pid` started (clock ticks since boot, from /proc), to tell it from a later process given
    the same pid; None where /proc is not there."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return int(handle.read().rsplit(") ", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (killed, not yet reaped) is not alive
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split(") ")[-1][:1] != "Z"
    except OSError:
        return True


def cancel_job(run_dir: Path) -> int | None:
    """Ask the process training in `run_dir` to stop (SIGTERM); it checkpoints and marks the job cancelled.

    Returns the pid signalled, or None when no live process holds the run dir.
    """
    import signal

    holder = RunLock(run_dir).holder()
    if not holder or holder.get("host") != platform.node():
        return None
    os.kill(int(holder["pid"]), signal.SIGTERM)
    return int(holder["pid"])
