"""The process a python grader runs in (started by `trainer.graders.sandbox`; never imported by ftlab).

    python -I sandbox_child.py <memory_mb> <cpu_seconds> <disk_mb>

It first locks itself in: memory, CPU-time and file-size limits, no network where the OS allows
(a network namespace of its own), then reads JSON lines on stdin: the grader's source, then one
`{"sample", "item"}` per call, and answers each with one JSON line: `{"score"}` or
`{"error": "runtime", "details"}`. What the grader prints goes to stderr, never into the answers.
"""
import ctypes
import json
import math
import os
import resource
import sys
import traceback

CLONE_NEWUSER, CLONE_NEWNET = 0x10000000, 0x40000000


def lock_in(memory_mb: int, cpu_seconds: int, disk_mb: int) -> bool:
    """Apply the limits; returns whether the network could be taken away."""
    resource.setrlimit(resource.RLIMIT_AS, (memory_mb << 20, memory_mb << 20))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds))
    resource.setrlimit(resource.RLIMIT_FSIZE, (disk_mb << 20, disk_mb << 20))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return False
    for flags in (CLONE_NEWUSER | CLONE_NEWNET, CLONE_NEWNET):  # unprivileged first, then as root
        if libc.unshare(flags) == 0:
            return True
    return False


def grader_traceback(error: BaseException) -> str:
    """The error and the grader's own lines of its traceback (not this file's)."""
    frames = [frame for frame in traceback.extract_tb(error.__traceback__) if frame.filename == "<grader>"]
    lines = [f"line {frame.lineno}, in {frame.name}" for frame in frames]
    return ("; ".join(lines) + ": " if lines else "") + "".join(traceback.format_exception_only(error)).strip()[-2000:]


def main() -> None:
    memory_mb, cpu_seconds, disk_mb = (int(value) for value in sys.argv[1:4])
    answers = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)  # the grader's own prints go to stderr
    isolated = lock_in(memory_mb, cpu_seconds, disk_mb)
    answers.write(json.dumps({"ready": True, "network_isolated": isolated}) + "\n")
    answers.flush()
    source = json.loads(sys.stdin.readline())["source"]
    namespace = {"__name__": "grader"}
    try:
        exec(compile(source, "<grader>", "exec"), namespace)  # noqa: S102 - the sandboxed user code, on purpose
        grade = namespace.get("grade")
        failure = None if callable(grade) else "the source defines no function grade(sample, item)"
    except BaseException as error:  # noqa: BLE001 - reported to the caller
        failure = grader_traceback(error)
    for line in sys.stdin:
        call = json.loads(line)
        if failure is not None:
            answer = {"error": "runtime", "details": failure}
        else:
            try:
                score = grade(call["sample"], call["item"])
                if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
                    answer = {"error": "runtime", "details": f"grade returned {score!r}, not a finite number"}
                else:
                    answer = {"score": float(score)}
            except BaseException as error:  # noqa: BLE001 - reported to the caller
                answer = {"error": "runtime", "details": grader_traceback(error)}
        answers.write(json.dumps(answer) + "\n")
        answers.flush()


if __name__ == "__main__":
    main()
