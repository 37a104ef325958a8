"""One `ftlab serve` per jobs root: `<jobs_root>/serve.lock`, held with flock for the server's lifetime.

Two servers on one root would both recover and relaunch its jobs. The lock is taken before the
server reads or writes anything under the root; the kernel releases it when the holder's process
ends however it ends, so a lock left by a killed server never blocks the next one. The file keeps
the holder's pid and address, for the message a second server prints.
"""
import fcntl
import json
import os
import time
from pathlib import Path
from typing import Optional


class RootInUse(RuntimeError):
    """Another server holds this jobs root."""


class RootLock:
    """`<root>/serve.lock`: `acquire` takes it or raises RootInUse naming the holder; `release` frees it."""

    def __init__(self, root: Path):
        self.path = Path(root) / "serve.lock"
        self._handle = None

    def acquire(self, address: str) -> None:
        """Take the lock for this process, which serves at `address` (host:port)."""
        handle = open(self.path, "a+", encoding="utf-8")  # never truncated before the lock is ours
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._holder(handle)
            handle.close()
            raise RootInUse(f"{self.path.parent} is already served by {holder}: one server per jobs_root. Stop that "
                            "server first, or give this one another jobs_root=") from None
        handle.seek(0)
        handle.truncate()
        json.dump({"pid": os.getpid(), "address": address, "started": int(time.time())}, handle)
        handle.flush()
        self._handle = handle

    def release(self) -> None:
        """Free the lock (closing the file releases it); a no-op when not held."""
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    @staticmethod
    def _holder(handle) -> str:
        handle.seek(0)
        try:
            holder: Optional[dict] = json.loads(handle.read() or "null")
        except ValueError:
            holder = None
        if not isinstance(holder, dict):
            return "another ftlab serve (starting up)"
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
        return f"ftlab serve pid {holder.get('pid')} at http://{holder.get('address')} (since {started})"
