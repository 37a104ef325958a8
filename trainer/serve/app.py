"""`ftlab serve`: the hosted fine-tuning API on this machine, as one FastAPI app on uvicorn.

    ftlab serve jobs_root=~/ftlab-jobs            # then OpenAI(base_url="http://127.0.0.1:8000/v1")

Everything lives under `jobs_root`: uploaded files in `files/`, each job's run directory in
`jobs/<ftjob-id>/` (the same record `ftlab train` leaves, so `ftlab jobs list root=<jobs_root>`
sees API jobs), and the index `ftlab.sqlite`. Jobs train in their own processes (`runner.py`);
the backbone in this process serves the fine-tuned adapters (`pool.py`).

Start-up order, so that a server that cannot serve touches nothing: check the settings, bind the
port, lock the jobs root (`root_lock.py`: one server per root), open the index, then recover and
relaunch jobs. Who may call is `auth.py`'s; what a body may be is `bodies.py`'s.
"""
import logging
import os
import signal
import socket
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from fastapi import Depends, FastAPI
from omegaconf import DictConfig

from trainer.serve.auth import Guard, allowed_host_names, is_loopback
from trainer.serve.bodies import BodyLimit, text_only_json
from trainer.serve.errors import install_error_handlers
from trainer.serve.root_lock import RootInUse, RootLock
from trainer.serve.store import Index

log = logging.getLogger("ftlab.serve")
# command-line keys that configure the server itself; every other override is passed on to each job
SERVER_KEYS = ("server.", "executor", "jobs_root", "hydra.", "hydra/", "job=", "prompt=", "system=")


@dataclass
class Server:
    """What the routes share: the server's config, where jobs live, the index, the job runner and the models."""

    cfg: DictConfig
    root: Path
    job_overrides: tuple[str, ...] = ()  # the serve command's overrides each job inherits (backbone=…, train.…)
    api_key: Optional[str] = None
    address: str = ""  # host:port it listens on, recorded in the root's lock for a second server's message
    lock: RootLock = field(init=False)
    index: Index = field(init=False)
    runner: object = field(init=False, default=None)
    models: object = field(init=False, default=None)

    def __post_init__(self):
        self.root = Path(self.root).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.lock = RootLock(self.root)
        self.lock.acquire(self.address)  # raises RootInUse naming the other server, before anything is read
        (self.root / "files").mkdir(parents=True, exist_ok=True)
        (self.root / "jobs").mkdir(parents=True, exist_ok=True)
        self.index = Index(self.root / "ftlab.sqlite")

    @classmethod
    def from_config(cls, cfg: DictConfig, overrides: tuple[str, ...] = (), address: str = "") -> "Server":
        """The server a composed config describes, listening at `address`; it holds the jobs root's lock."""
        from trainer.jobs import jobs_root

        job_overrides = tuple(o for o in overrides if not o.lstrip("+~").startswith(SERVER_KEYS))
        return cls(cfg, jobs_root(cfg.get("jobs_root")), job_overrides, configured_key(cfg), address)

    def start(self) -> None:
        """Start the job runner (which picks up what a previous server left) and the model pool."""
        from hydra.utils import instantiate

        from trainer.serve.pool import ModelPool
        from trainer.serve.runner import JobRunner

        executor = instantiate(self.cfg.executor) if self.cfg.get("executor") else None
        self.runner = JobRunner(self, executor)
        self.runner.start()
        self.models = ModelPool(self.cfg, self.root)

    def stop(self) -> None:
        """Stop the runner's threads (jobs keep training; the next server adopts them) and free the models."""
        if self.runner is not None:
            self.runner.stop()
        if self.models is not None:
            self.models.close()
        self.index.close()
        self.lock.release()


def configured_key(cfg: DictConfig) -> Optional[str]:
    """The API key: `server.api_key`, else `$FTLAB_API_KEY`, else none."""
    return cfg.server.api_key or os.environ.get("FTLAB_API_KEY") or None


def check_bind_address(host: str, api_key: Optional[str]) -> None:
    """Refuse to listen beyond loopback without an API key."""
    if not is_loopback(host) and not api_key:
        raise ValueError(f"server.host={host} is not a loopback address: set server.api_key (or FTLAB_API_KEY) "
                         "so that only clients with the key can use the server, or keep server.host=127.0.0.1")


class PortUnavailable(RuntimeError):
    """The server's host:port cannot be listened on (another server has it, or the address is not this machine's)."""


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to host:port and listening, for uvicorn to serve on: the port is this server's before
    it touches any job. Raises PortUnavailable saying what to change."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)  # listening, not just bound: a second bind on the port fails from here on
    except OSError as error:
        sock.close()
        raise PortUnavailable(f"cannot listen on {address_of(host, port)}: {error.strerror}. Is another server "
                              "running there? Choose another server.port= (or server.host=)") from None
    return sock


def address_of(host: str, port: int) -> str:
    """host:port, an IPv6 host in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def create_app(server: Server, *, start: bool = True) -> FastAPI:
    """The app: the /v1 API (files, fine-tuning jobs, models, chat and completions) behind the key check, and
    the dashboard (pages at /, /jobs/<id>, /new, /playground, /files; its data under /ui/api, behind the key)."""
    from trainer.serve import files_api, graders_api, inference_api, jobs_api, models_api, ui

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if start:
            server.start()
        try:
            yield
        finally:
            server.stop()

    # no /docs (Swagger UI loads from a CDN); /openapi.json is served behind the key, like the API
    app = FastAPI(title="ftlab", summary="The hosted fine-tuning API on your own machine", lifespan=lifespan,
                  docs_url=None, redoc_url=None, openapi_url="/openapi.json")
    app.state.server = server
    install_error_handlers(app)
    for module in (files_api, jobs_api, models_api, inference_api, graders_api):
        app.include_router(module.router, prefix="/v1", dependencies=[Depends(text_only_json)])
    app.include_router(ui.router)
    app.add_middleware(BodyLimit, max_bytes=server.cfg.server.max_request_kb * 1024,
                       max_upload_bytes=server.cfg.server.max_upload_mb * 1024 * 1024)
    app.add_middleware(Guard, api_key=server.api_key, allowed_hosts=server.cfg.server.allowed_hosts,
                       public=ui.is_page)  # added last: runs first, before any body is read
    return app


def serve_main(cfg: DictConfig, overrides: tuple[str, ...] = ()) -> int:
    """`ftlab serve`: run the API on `server.host:server.port` until SIGTERM or Ctrl-C."""
    import uvicorn

    host, port = cfg.server.host, cfg.server.port
    try:
        check_bind_address(host, configured_key(cfg))
        allowed_host_names(cfg.server.allowed_hosts)
    except ValueError as error:
        print(f"ftlab serve: {error}")
        return 2
    try:
        sock = listen(host, port)
    except PortUnavailable as error:
        print(f"ftlab serve: {error}", flush=True)
        return 1
    try:
        server = Server.from_config(cfg, overrides, address_of(host, port))
    except RootInUse as error:
        sock.close()
        print(f"ftlab serve: {error}", flush=True)
        return 1
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    url = f"http://{address_of(host, port)}"
    print(f"ftlab serve: API {url}/v1, dashboard {url}/  (jobs_root {server.root}; "
          f"{'API key required' if server.api_key else 'no API key: loopback only'})", flush=True)
    # uvicorn stops gracefully on SIGTERM or Ctrl-C, then re-raises the signal to the handler it found
    # there: a no-op one lets `ftlab serve` end with exit code 0 after that clean stop.
    for stop_signal in (signal.SIGINT, signal.SIGTERM):
        signal.signal(stop_signal, lambda *_: None)
    uv = uvicorn.Server(uvicorn.Config(create_app(server), host=host, port=port, log_level="info",
                                       timeout_graceful_shutdown=5))
    uv.run(sockets=[sock])
    if not uv.started:
        print("ftlab serve: the server did not start (the log above says why)", flush=True)
        return 1
    print("ftlab serve: stopped; running jobs keep training and the next `ftlab serve` follows them", flush=True)
    return 0


@contextmanager
def background_server(overrides: list[str], api_key: Optional[str] = None, timeout: float = 120):
    """`ftlab serve <overrides>` in a thread of this process on a free loopback port; yields (base_url, server).

    For tests, benchmarks and notebooks; ready (GET /v1/models answers) when the block starts.
    """
    import threading
    import time

    import httpx
    import uvicorn

    from trainer.compose import compose

    overrides = [*overrides] + ([f"server.api_key={api_key}"] if api_key else [])
    cfg = compose(overrides)
    sock = listen("127.0.0.1", 0)
    port = sock.getsockname()[1]
    try:
        server = Server.from_config(cfg, tuple(overrides), address_of("127.0.0.1", port))
    except BaseException:
        sock.close()
        raise
    uv = uvicorn.Server(uvicorn.Config(create_app(server), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, name="ftlab-serve", daemon=True)
    thread.start()
    base_url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.time() + timeout
        while True:
            try:
                headers = {"Authorization": f"Bearer {api_key or 'x'}"}
                if httpx.get(f"{base_url}/models", headers=headers, timeout=2).status_code < 500:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline or not thread.is_alive():
                raise TimeoutError(f"ftlab serve did not answer at {base_url} within {timeout} s")
            time.sleep(0.1)
        yield base_url, server
    finally:
        uv.should_exit = True
        thread.join(timeout=30)
        sock.close()
        server.lock.release()  # stop() released it, unless the app never started
