"""python graders: `grade(sample, item)` in a process of its own, that can neither read the server's
secrets nor hang it.

The process (`sandbox_child.py`, under `python -I`) starts with an empty environment (no key,
no token can be read from it), in a scratch folder that is deleted afterwards, in a session of
its own, and locks itself in before it reads the grader: memory (`memory_mb`), CPU time and file
size limits, and no network where the OS allows it (a network namespace of its own). Each call
must answer within `timeout_s`; a call that does not, or a process that dies (out of memory,
killed), scores nothing and gets the hosted `python_grader_server_error` flag with its type, and
the next calls go to a fresh process. An exception in `grade`, or a result that is not a finite
number, is a `python_grader_runtime_error` with its details.
"""
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

CHILD = Path(__file__).with_name("sandbox_child.py")
MAX_SOURCE_BYTES = 256 * 1024  # the hosted limit
START_TIMEOUT_S = 30


@dataclass
class PythonResult:
    """One call's outcome: a score, or an error kind ("runtime" | "server") with details."""

    score: Optional[float] = None
    error: Optional[str] = None
    details: Optional[str] = None


@dataclass
class Limits:
    """What a python grader's process may use (the hosted sandbox: 2 minutes, 2 GB, 1 GB of disk)."""

    timeout_s: float = 30.0
    memory_mb: int = 2048
    disk_mb: int = 1024


class _Process:
    """One sandboxed grader process, fed the source once and then one call at a time."""

    def __init__(self, source: str, limits: Limits, scratch: str):
        cpu_seconds = int(limits.timeout_s * 4) + 10  # CPU time is a backstop; the wall clock is checked per call
        environment = {"HOME": scratch, "TMPDIR": scratch, "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1",
                       "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
        self.process = subprocess.Popen(
            [sys.executable, "-I", str(CHILD), str(limits.memory_mb), str(cpu_seconds), str(limits.disk_mb)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=scratch, env=environment,
            start_new_session=True, text=True, bufsize=1)
        self.limits = limits
        ready = self.read(START_TIMEOUT_S)
        if ready is None or not ready.get("ready"):
            self.kill()
            raise OSError("the python grader's process did not start")
        self.network_isolated = bool(ready.get("network_isolated"))
        self.process.stdin.write(json.dumps({"source": source}) + "\n")

    def read(self, timeout_s: float) -> Optional[dict]:
        """The next answer line, or None if none came in time or the process died."""
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([self.process.stdout], [], [], left)
            if ready:
                line = self.process.stdout.readline()
                return json.loads(line) if line else None

    def call(self, sample: dict, item: dict) -> PythonResult:
        try:
            self.process.stdin.write(json.dumps({"sample": sample, "item": item}) + "\n")
            self.process.stdin.flush()
        except (BrokenPipeError, OSError):
            return PythonResult(error="server", details=self.ending())
        answer = self.read(self.limits.timeout_s)
        if answer is None:
            details = self.ending() if self.process.poll() is not None else f"timeout after {self.limits.timeout_s:g} s"
            self.kill()
            return PythonResult(error="server", details=details)
        if "score" in answer:
            return PythonResult(score=answer["score"])
        return PythonResult(error="runtime", details=answer.get("details"))

    def ending(self) -> str:
        """How the process ended: killed by which signal (memory, CPU time), or its exit code."""
        code = self.process.wait(timeout=5)
        if code < 0:
            name = signal.Signals(-code).name
            return {"SIGKILL": "killed (out of memory?)", "SIGXCPU": "CPU time limit"}.get(name, name)
        return f"exited with code {code}"

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def kill(self) -> None:
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.process.wait()
        for stream in (self.process.stdin, self.process.stdout):
            try:
                stream.close()
            except OSError:
                pass


def run_python(source: str, calls: list[tuple[dict, dict]], limits: Limits = Limits()) -> list[PythonResult]:
    """Each (sample, item) graded by `source`'s `grade`, in order; one process for all, a fresh one after a
    call that hangs or kills its process."""
    results = []
    with tempfile.TemporaryDirectory(prefix="ftlab-grader-") as scratch:
        process = None
        try:
            for sample, item in calls:
                if process is None or not process.alive:
                    try:
                        process = _Process(source, limits, scratch)
                    except OSError as error:
                        results.append(PythonResult(error="server", details=str(error)))
                        continue
                results.append(process.call(sample, item))
        finally:
            if process is not None:
                process.kill()
    return results


def check_source(source: object) -> str:
    """`source` as the hosted service takes it, or ValueError: text under 256 KB that defines `grade`."""
    import ast

    if not isinstance(source, str) or not source.strip():
        raise ValueError("source must be the grader's Python code, defining grade(sample, item)")
    if len(source.encode("utf-8")) > MAX_SOURCE_BYTES:
        raise ValueError(f"source is over {MAX_SOURCE_BYTES // 1024} KB")
    try:
        tree = ast.parse(source)
    except SyntaxError as error:
        raise ValueError(f"source does not parse: {error.msg} at line {error.lineno}") from None
    functions = {node.name: node for node in tree.body if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}
    grade = functions.get("grade")
    if grade is None or isinstance(grade, ast.AsyncFunctionDef):
        raise ValueError("source must define a function grade(sample, item) at its top level")
    if len(grade.args.args) + len(grade.args.posonlyargs) < 2 and grade.args.vararg is None:
        raise ValueError("grade must take two arguments: grade(sample, item)")
    return source
