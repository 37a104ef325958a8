"""`ftlab serve`: the hosted fine-tuning API on this machine, as one FastAPI app on uvicorn.

    ftlab serve jobs_root=~/ftlab-jobs            # then OpenAI(base_url="http://127.0.0.1:8000/v1")

Everything lives under `jobs_root`: uploaded files in `files/`, each job's run directory in
`jobs/<ftjob-id>/` (the same record `ftlab train` leaves, so `ftlab jobs list root=<jobs_root>`
sees API jobs), and the index `ftlab.sqlite`. Jobs train in their own processes (`runner.py`);
the backbone in this process serves the fine-tuned adapters (`pool.py`).
"""
import hmac
import ipaddress
import logging
import os
import signal
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from fastapi import Depends, FastAPI, Request
from omegaconf import DictConfig

from trainer.serve.errors import APIError, error_response, install_error_handlers
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
    index: Index = field(init=False)
    runner: object = field(init=False, default=None)
    models: object = field(init=False, default=None)

    def __post_init__(self):
        self.root = Path(self.root).expanduser().resolve()
        (self.root / "files").mkdir(parents=True, exist_ok=True)
        (self.root / "jobs").mkdir(parents=True, exist_ok=True)
        self.index = Index(self.root / "ftlab.sqlite")

    @classmethod
    def from_config(cls, cfg: DictConfig, overrides: tuple[str, ...] = ()) -> "Server":
        """The server a composed config describes; the key comes from `server.api_key`, else `$FTLAB_API_KEY`."""
        from trainer.jobs import jobs_root

        job_overrides = tuple(o for o in overrides if not o.lstrip("+~").startswith(SERVER_KEYS))
        return cls(cfg, jobs_root(cfg.get("jobs_root")), job_overrides,
                   cfg.server.api_key or os.environ.get("FTLAB_API_KEY") or None)

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


def check_bind_address(host: str, api_key: Optional[str]) -> None:
    """Refuse to listen beyond loopback without an API key."""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback and not api_key:
        raise ValueError(f"server.host={host} is not a loopback address: set server.api_key (or FTLAB_API_KEY) "
                         "so that only clients with the key can use the server, or keep server.host=127.0.0.1")


def require_key(request: Request) -> None:
    """With a key configured, every API call must send it as `Authorization: Bearer <key>` (compared in constant time)."""
    key = request.app.state.server.api_key
    if not key:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise APIError(401, "Incorrect API key provided. Send the server's key (server.api_key or FTLAB_API_KEY) as "
                       "the client's api_key.", code="invalid_api_key")


class BodyLimit:
    """ASGI middleware: a request body over the cap is refused with 413 before it is read whole.
    File uploads have their own, larger cap (`server.max_upload_mb`)."""

    def __init__(self, app, max_bytes: int, max_upload_bytes: int):
        self.app, self.max_bytes, self.max_upload_bytes = app, max_bytes, max_upload_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        upload = scope["path"].rstrip("/").endswith("/v1/files") and scope["method"] == "POST"
        cap = self.max_upload_bytes + (1 << 20) if upload else self.max_bytes  # multipart framing on top
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > cap:
            return await error_response(413, f"Request body of {int(length):,} bytes is over this server's limit of "
                                        f"{cap:,} bytes", None, "request_too_large")(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > cap:
                    raise APIError(413, f"Request body is over this server's limit of {cap:,} bytes",
                                   code="request_too_large")
            return message

        return await self.app(scope, counted, send)


def create_app(server: Server, *, start: bool = True) -> FastAPI:
    """The app: the /v1 API (files, fine-tuning jobs, models, chat and completions) behind the key check, and
    the dashboard (pages at /, /jobs/<id>, /new, /playground, /files; its data under /ui/api, behind the key)."""
    from trainer.serve import files_api, inference_api, jobs_api, models_api, ui

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if start:
            server.start()
        try:
            yield
        finally:
            server.stop()

    app = FastAPI(title="ftlab", summary="The hosted fine-tuning API on your own machine", lifespan=lifespan,
                  docs_url="/docs", redoc_url=None, openapi_url="/openapi.json")
    app.state.server = server
    install_error_handlers(app)
    for module in (files_api, jobs_api, models_api, inference_api):
        app.include_router(module.router, prefix="/v1", dependencies=[Depends(require_key)])
    app.include_router(ui.router)
    app.add_middleware(BodyLimit, max_bytes=server.cfg.server.max_request_kb * 1024,
                       max_upload_bytes=server.cfg.server.max_upload_mb * 1024 * 1024)
    return app


def serve_main(cfg: DictConfig, overrides: tuple[str, ...] = ()) -> int:
    """`ftlab serve`: run the API on `server.host:server.port` until SIGTERM or Ctrl-C."""
    import uvicorn

    server = Server.from_config(cfg, overrides)
    try:
        check_bind_address(cfg.server.host, server.api_key)
    except ValueError as error:
        print(f"ftlab serve: {error}")
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    print(f"ftlab serve: API http://{cfg.server.host}:{cfg.server.port}/v1, dashboard "
          f"http://{cfg.server.host}:{cfg.server.port}/  (jobs_root {server.root}; "
          f"{'API key required' if server.api_key else 'no API key: loopback only'})", flush=True)
    # uvicorn stops gracefully on SIGTERM or Ctrl-C, then re-raises the signal to the handler it found
    # there: a no-op one lets `ftlab serve` end with exit code 0 after that clean stop.
    for stop_signal in (signal.SIGINT, signal.SIGTERM):
        signal.signal(stop_signal, lambda *_: None)
    uvicorn.run(create_app(server), host=cfg.server.host, port=cfg.server.port, log_level="info",
                timeout_graceful_shutdown=5)
    print("ftlab serve: stopped; running jobs keep training and the next `ftlab serve` follows them", flush=True)
    return 0


@contextmanager
def background_server(overrides: list[str], api_key: Optional[str] = None, timeout: float = 120):
    """`ftlab serve <overrides>` in a thread of this process on a free loopback port; yields (base_url, server).

    For tests, benchmarks and notebooks; ready (GET /v1/models answers) when the block starts.
    """
    import socket
    import threading
    import time

    import httpx
    import uvicorn
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from trainer.cli import CONFIG_DIR
    from trainer.schema import register_configs

    overrides = [*overrides] + ([f"server.api_key={api_key}"] if api_key else [])
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    server = Server.from_config(cfg, tuple(overrides))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    uv = uvicorn.Server(uvicorn.Config(create_app(server), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, name="ftlab-serve", daemon=True)
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
