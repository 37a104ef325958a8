"""OpenMP's idle threads, set before torch loads: what a server's decoding thread needs to run at full speed.

torch's CPU kernels run on libgomp, which gives each thread that starts a parallel region a team of
its own. `ftlab serve` loads models in one thread and decodes in the engine's thread, so two teams
exist; libgomp then counts more threads than cores and "throttles": idle threads sleep at once
instead of spinning, and every parallel region pays a futex wake-up. On 2 cores that made a 1-row
oneDNN projection 88 µs in the engine's thread against 36 µs in the main thread, and a decoding step
twice as slow. `OMP_WAIT_POLICY=ACTIVE` with a finite `GOMP_SPINCOUNT` keeps the spinning libgomp
does for a single team (300,000 spins, then sleep) whatever the number of teams: 38 µs in the
engine's thread. The variables are read once, when torch loads libgomp; a value already in the
environment is kept. A server's training jobs (one team each) start without the ones set here.
"""
import os

SETTINGS = {"OMP_WAIT_POLICY": "ACTIVE", "GOMP_SPINCOUNT": "300000"}
set_here: set[str] = set()  # the SETTINGS this process added: not handed on to the training jobs it starts


def spin_idle_threads() -> None:
    """Set SETTINGS in the environment (where unset), before anything imports torch."""
    for key, value in SETTINGS.items():
        if key not in os.environ:
            os.environ[key] = value
            set_here.add(key)
