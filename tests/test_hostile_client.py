"""`ftlab serve` driven as a hostile client would drive it: raw httpx requests (the openai client would
sanitize them) against a live server on the tiny Llama. One test per rule: who may call (Host, Origin,
key), what is served without a key (/docs, /openapi.json), what bad input gets (a 400 or 413 in the
hosted shape, never a 500 or a dropped connection), and one server per jobs root (real processes).
"""
import ast
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import REPO, chat_example, write_jsonl
from tests.live_server import free_port, live_server, serve_process, wait_ready

KEY = "sk-hostile-test"
JSON = {"Content-Type": "application/json"}
CHAT = {"model": "gpt-3.5-turbo", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}


def overrides(cache_dir: str, *extra: str) -> list[str]:
    return ["backbone=tiny-llama", "logger=none", "train.device=cpu", "train.precision=fp32", f"cache_dir={cache_dir}",
            "moderation=off", *extra]


@pytest.fixture(scope="module")
def open_server(tmp_path_factory, cache_dir):
    """No key (loopback only), one extra host name, small caps; yields (base URL without /v1, jobs root)."""
    root = tmp_path_factory.mktemp("hostile") / "root"
    settings = overrides(cache_dir, "server.allowed_hosts=[gpu-box.lan]", "server.max_request_kb=64",
                         "server.max_upload_mb=1")
    with live_server(root, settings) as (url, _):
        yield url.removesuffix("/v1"), root


@pytest.fixture(scope="module")
def http(open_server):
    with httpx.Client(base_url=open_server[0], timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory, cache_dir):
    """With a key and no allowed_hosts; yields the base URL without /v1."""
    with live_server(tmp_path_factory.mktemp("hostile-key") / "root", overrides(cache_dir), api_key=KEY) as (url, _):
        yield url.removesuffix("/v1")


def assert_error(response: httpx.Response, status: int, code: str | None = None, param: str | None = "any") -> dict:
    """The response is the hosted error shape with this status (and code, param); returns the error."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and "Traceback" not in error["message"]
    assert code is None or error["code"] == code, error
    assert param == "any" or error["param"] == param, error
    return error


def port_of(base: str) -> int:
    return int(base.rsplit(":", 1)[1])


def upload(http: httpx.Client, content: bytes = b'{"a": 1}\n', **headers) -> httpx.Response:
    return http.post("/v1/files", files={"file": ("t.jsonl", content)}, data={"purpose": "fine-tune"}, headers=headers)


# ---- who may call ------------------------------------------------------------------------------
def test_auth_lives_in_its_own_module_and_nothing_in_serve_imports_the_app():
    """auth.py holds the key, Host and Origin checks; serve/ modules never import app.py (no cycle)."""
    serve = REPO / "trainer" / "serve"
    importers = []
    for path in serve.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else \
                [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
            if any(name == "trainer.serve.app" for name in names) and path.name != "app.py":
                importers.append(str(path.relative_to(REPO)))
    assert importers == []
    from trainer.serve import auth

    assert {"Guard", "is_loopback", "allowed_host_names"} <= set(vars(auth))


def test_without_a_key_only_loopback_and_allowed_host_names_are_answered(http, open_server):
    """DNS rebinding: a foreign name that resolves to 127.0.0.1 gets a 400, pages and uploads included."""
    port, files = port_of(open_server[0]), sorted((open_server[1] / "files").iterdir())
    for host in (f"127.0.0.1:{port}", "127.0.0.1", f"localhost:{port}", "LocalHost", f"[::1]:{port}", "[::1]",
                 f"gpu-box.lan:{port}", "GPU-BOX.lan"):
        assert http.get("/v1/models", headers={"Host": host}).status_code == 200, host
    for host in ("evil.example", f"evil.example:{port}", f"127.0.0.1.evil.example:{port}", "localhost.evil.example",
                 "gpu-box.lan.evil.example", "10.0.0.5", "[::2]:80", "", "a@127.0.0.1", "127.0.0.1:99999"):
        error = assert_error(http.get("/v1/models", headers={"Host": host}), 400, "invalid_host", None)
        assert "server.allowed_hosts" in error["message"] or "malformed" in error["message"]
    assert_error(http.get("/", headers={"Host": "evil.example"}), 400, "invalid_host")
    assert_error(upload(http, Host="evil.example"), 400, "invalid_host")
    assert sorted((open_server[1] / "files").iterdir()) == files  # the refused upload left nothing


def test_with_a_key_any_host_is_answered_unless_allowed_hosts_is_set(keyed_server, tmp_path, cache_dir):
    """With a key, the key protects the server whatever name reaches it; server.allowed_hosts, when set,
    narrows the names again (loopback stays)."""
    auth = {"Authorization": f"Bearer {KEY}"}
    assert httpx.get(f"{keyed_server}/v1/models", headers=auth | {"Host": "gpu-box.example:8000"}).status_code == 200
    assert_error(httpx.get(f"{keyed_server}/v1/models", headers={"Host": "gpu-box.example"}), 401, "invalid_api_key")
    settings = overrides(cache_dir, "server.allowed_hosts=[gpu-box.example]")
    with live_server(tmp_path / "root", settings, api_key=KEY) as (url, _):
        assert httpx.get(f"{url}/models", headers=auth | {"Host": "gpu-box.example"}).status_code == 200
        assert httpx.get(f"{url}/models", headers=auth | {"Host": "localhost"}).status_code == 200
        assert_error(httpx.get(f"{url}/models", headers=auth | {"Host": "evil.example"}), 400, "invalid_host")


def test_cross_site_state_changes_are_refused_and_same_origin_ones_pass(http, open_server):
    """A web page elsewhere cannot make the user's browser upload, create or delete: 403 by Origin (`null`
    included) or Sec-Fetch-Site; the dashboard's own origin and clients without an Origin pass."""
    base, root = open_server
    own, files = base, sorted((root / "files").iterdir())  # own: http://127.0.0.1:<port>, as the dashboard sends
    for headers in ({"Origin": "http://evil.example"}, {"Origin": "null"}, {"Origin": base.replace("127.0.0.1", "localhost")},
                    {"Origin": f"https://127.0.0.1:{port_of(base)}"}, {"Origin": "http://127.0.0.1"},
                    {"Origin": "not a url"}, {"Sec-Fetch-Site": "cross-site"},
                    {"Origin": own, "Sec-Fetch-Site": "same-site"}):
        assert_error(upload(http, **headers), 403, "cross_origin_request", None)
    assert sorted((root / "files").iterdir()) == files
    created = upload(http, Origin=own, **{"Sec-Fetch-Site": "same-origin"})
    assert created.status_code == 200, created.text
    file_id = created.json()["id"]
    assert_error(http.delete(f"/v1/files/{file_id}", headers={"Origin": "http://evil.example"}), 403)
    assert_error(http.post("/v1/fine_tuning/jobs", json={"model": "gpt-3.5-turbo", "training_file": file_id},
                           headers={"Origin": "http://evil.example"}), 403)
    assert http.get(f"/v1/files/{file_id}", headers={"Origin": "http://evil.example"}).status_code == 200  # reads pass
    assert http.delete(f"/v1/files/{file_id}").json()["deleted"]  # curl and the openai client send no Origin


def test_docs_are_off_and_openapi_is_behind_the_key(http, keyed_server):
    assert_error(http.get("/docs"), 404)
    assert_error(http.get("/redoc"), 404)
    assert http.get("/openapi.json").json()["paths"]["/v1/files"]  # no key configured: open, as the API
    assert_error(httpx.get(f"{keyed_server}/openapi.json"), 401, "invalid_api_key")
    spec = httpx.get(f"{keyed_server}/openapi.json", headers={"Authorization": f"Bearer {KEY}"})
    assert "/v1/chat/completions" in spec.json()["paths"]
    assert_error(httpx.get(f"{keyed_server}/docs", headers={"Authorization": f"Bearer {KEY}"}), 404)
    page = httpx.get(f"{keyed_server}/")  # the dashboard's pages hold no data: no key needed
    assert page.status_code == 200 and "cdn" not in page.text.lower()
    assert httpx.get(f"{keyed_server}/static/js/api.js").status_code == 200
    assert_error(httpx.get(f"{keyed_server}/ui/api/jobs"), 401, "invalid_api_key")


def test_the_key_is_checked_before_the_body_is_read(keyed_server):
    """Without the key, a malformed, oversized or surrogate-laden body gets the 401, not a 400 or 413."""
    url = f"{keyed_server}/v1/fine_tuning/jobs"
    assert_error(httpx.post(url, content=b"{not json", headers=JSON), 401, "invalid_api_key")
    assert_error(httpx.post(url, content=b"{" + b" " * (2 << 20) + b"}", headers=JSON), 401, "invalid_api_key")
    assert_error(httpx.post(url, content=b'{"suffix": "\\ud800"}', headers=JSON), 401, "invalid_api_key")
    assert_error(httpx.post(url, content=b"{not json", headers=JSON | {"Authorization": "Bearer wrong"}), 401)
    assert_error(httpx.post(url, content=b"{not json", headers=JSON | {"Authorization": f"Bearer {KEY}"}), 400,
                 "invalid_json")


# ---- bad input ---------------------------------------------------------------------------------
def test_completions_refuse_token_ids_outside_the_vocabulary_and_empty_or_mixed_prompts(http):
    def complete(prompt):
        return http.post("/v1/completions", json={"model": "babbage-002", "prompt": prompt, "max_tokens": 2})

    assert complete([1, 2, 3]).status_code == 200
    for prompt, words in (([-1], "token id -1"), ([10**9], "token id 1000000000"), ([10**30], "outside"),
                          ([[1, 2], [5, 999999]], "prompt[1]: token id 999999"), ([], "empty list"),
                          ([[]], "prompt[0]: the prompt is empty"), ("", "prompt: the prompt is empty"),
                          ([1, "a"], "mixing"), ([[1], "a"], "mixing"), (["a", 1], "mixing"), ([True], ""),
                          ([1.5], ""), ([[1, None]], ""), ({"a": 1}, "")):
        error = assert_error(complete(prompt), 400, param="prompt")
        assert words in error["message"], (prompt, error)


@pytest.mark.parametrize("where", [
    'messages.[0].content', 'messages.[0].name', 'messages.[0].content.[0].text',
    'messages.[0].tool_calls.[0].function.arguments', 'tools.[0].function.name', 'prompt'])
def test_lone_surrogates_get_a_400_naming_the_field(http, where):
    """`"\\ud800"` is valid JSON that decodes to a str no tokenizer or response can encode."""
    lone = "\\ud800"
    message = {"role": "user", "content": "x"}
    if where == "messages.[0].content":
        body = {"messages": [{"role": "user", "content": lone}]}
    elif where == "messages.[0].name":
        body = {"messages": [message | {"name": lone}]}
    elif where == "messages.[0].content.[0].text":
        body = {"messages": [{"role": "user", "content": [{"type": "text", "text": lone}]}]}
    elif where == "messages.[0].tool_calls.[0].function.arguments":
        call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": lone}}
        body = {"messages": [{"role": "assistant", "content": None, "tool_calls": [call]}, message]}
    elif where == "tools.[0].function.name":
        body = {"messages": [message], "tools": [{"type": "function", "function": {"name": lone, "parameters": {}}}]}
    else:
        body = {"prompt": f"ok {lone}"}
    model = "babbage-002" if where == "prompt" else "gpt-3.5-turbo"
    raw = json.dumps({"model": model, "max_tokens": 2} | body).replace("\\\\ud800", "\\ud800").encode()
    path = "/v1/completions" if where == "prompt" else "/v1/chat/completions"
    error = assert_error(http.post(path, content=raw, headers=JSON), 400, "invalid_unicode", where)
    assert "lone UTF-16 surrogate" in error["message"]
    paired = raw.replace(b"\\ud800", b"\\ud83d\\ude00")  # a surrogate pair is an emoji, and fine
    assert http.post(path, content=paired, headers=JSON).status_code != 500


def test_malformed_json_names_its_line_and_column_not_a_param(http):
    error = assert_error(http.post("/v1/chat/completions", content=b'{"model": "gpt-3.5-turbo"\n "x": 1}',
                                   headers=JSON), 400, "invalid_json", None)
    assert error["message"] == "Invalid JSON body: Expecting ',' delimiter at line 2 column 2"
    error = assert_error(http.post("/v1/fine_tuning/jobs", content=b'{"model": "\xff"}', headers=JSON), 400,
                         "invalid_json", None)
    assert error["message"].startswith("Invalid JSON body: not UTF-8 text")
    deep = b'{"model": "x", "n": ' + b"[" * 20000 + b"]" * 20000 + b"}"
    assert_error(http.post("/v1/chat/completions", content=deep, headers=JSON), 400, "invalid_json", None)


def test_chunked_bodies_over_the_cap_get_413(http, open_server):
    """Transfer-Encoding: chunked (no Content-Length) past server.max_request_kb / max_upload_mb: 413."""
    files = sorted((open_server[1] / "files").iterdir())

    def chunks(total: int, first: bytes = b"", last: bytes = b""):
        yield first
        for _ in range(total // 65536):
            yield b" " * 65536
        yield last

    body = chunks(200 * 1024, b'{"model": "gpt-3.5-turbo", "messages": []', b"}")  # 64 KB cap
    assert_error(http.post("/v1/chat/completions", content=body, headers=JSON), 413, "request_too_large")
    assert_error(http.post("/v1/fine_tuning/jobs", content=b"{" + b" " * (100 << 10) + b"}", headers=JSON), 413)
    head = (b'--B\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n--B\r\n'
            b'Content-Disposition: form-data; name="file"; filename="big.jsonl"\r\n\r\n')
    upload_body = chunks(3 << 20, head, b"\r\n--B--\r\n")  # 1 MB cap
    assert_error(http.post("/v1/files", content=upload_body, headers={"Content-Type": "multipart/form-data; boundary=B"}),
                 413)
    assert sorted((open_server[1] / "files").iterdir()) == files  # nothing left of the refused upload


def test_other_hostile_input_gets_a_4xx_in_the_hosted_shape_never_a_500(http):
    """Odd types, huge numbers, non-object bodies, bad query parameters and odd ids."""
    chat = [{"n": 10**20}, {"n": 0}, {"max_tokens": 10**20}, {"max_tokens": -1}, {"stop": 5}, {"stop": [1, 2]},
            {"stop": {"a": 1}}, {"stop": ["a"] * 5}, {"temperature": "NaN"}, {"top_p": 1e999}, {"messages": []},
            {"messages": [{"role": 5}]}, {"messages": [{"role": "wizard", "content": "x"}]},
            {"messages": [{"role": "user", "content": [1]}]}, {"messages": "hi"}, {"tool_choice": "bogus"},
            {"tool_choice": 5}, {"tools": [1]}, {"tools": [{"type": "function"}]}, {"function_call": "bogus"},
            {"stream_options": "x"}, {"model": ["x"]}, {"model": "nope"}]
    for extra in chat:
        response = http.post("/v1/chat/completions", content=json.dumps(CHAT | extra), headers=JSON)
        assert 400 <= response.status_code < 500, (extra, response.text)
        assert_error(response, response.status_code)
    assert_error(http.post("/v1/chat/completions", content=json.dumps(CHAT | {"stop": 5}), headers=JSON), 400,
                 param="stop")  # the field, not pydantic's union member ("stop.str")
    for body in (b"[]", b'"x"', b"null", b"1", b"{}"):
        for path in ("/v1/chat/completions", "/v1/completions", "/v1/fine_tuning/jobs"):
            assert_error(http.post(path, content=body, headers=JSON), 400)
    for query in ("limit=-1", "limit=abc", "limit=99999999999999999999999", "after=" + "9" * 5000, "after=%00",
                  "after=..%2F..%2Fftlab.sqlite", "limit=1&limit=x"):
        for path in ("/v1/fine_tuning/jobs", "/v1/files", "/ui/api/jobs"):
            response = http.get(f"{path}?{query}")
            assert response.status_code < 500, (path, query, response.text)
            if response.status_code >= 400:
                assert_error(response, response.status_code)
    for ident in ("..", "%2E%2E", "a%00b", "a%2Fb", "%2F..%2Fftlab.sqlite", "x" * 5000, "%ff", "%ED%A0%80",
                  "ft:a:b:c:d:ckpt-step-x"):
        for path in (f"/v1/fine_tuning/jobs/{ident}", f"/v1/files/{ident}/content", f"/v1/models/{ident}",
                     f"/v1/fine_tuning/jobs/{ident}/events", f"/ui/api/jobs/{ident}", f"/ui/api/files/{ident}/report",
                     f"/static/{ident}", f"/static/js/{ident}", f"/jobs/{ident}"):
            response = http.get(path)
            assert response.status_code < 500, (path, response.text)
            if response.status_code >= 400:
                assert_error(response, response.status_code)


# ---- one server per jobs root ------------------------------------------------------------------
def serve_once(root: Path, port: int, cache_dir: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """`ftlab serve` run to its end (for a server that must refuse to start)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline", PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "trainer", "serve", f"jobs_root={root}", f"server.port={port}",
                           *overrides(cache_dir)], capture_output=True, text=True, env=env, cwd=str(REPO),
                          timeout=timeout)


def snapshot(root: Path) -> dict:
    return {str(path.relative_to(root)): (path.stat().st_size, path.stat().st_mtime_ns)
            for path in sorted(root.rglob("*")) if path.is_file()}


def test_one_server_per_jobs_root_and_a_dead_servers_lock_does_not_block(tmp_path, cache_dir):
    """A second server on the same root exits non-zero naming the first, touching nothing; after the first
    is killed (SIGKILL: no clean-up), the next server starts on the same root."""
    root = tmp_path / "root"
    few = write_jsonl(tmp_path / "few.jsonl", [chat_example(f"q{i}", f"a{i}") for i in range(3)])
    with serve_process(root, overrides(cache_dir)) as (url, first):
        with httpx.Client(base_url=url.removesuffix("/v1"), timeout=60) as http:
            file_id = upload(http, few.read_bytes()).json()["id"]
            job = http.post("/v1/fine_tuning/jobs", json={"model": "gpt-3.5-turbo", "training_file": file_id}).json()
            deadline = time.time() + 60
            while http.get(f"/v1/fine_tuning/jobs/{job['id']}").json()["status"] != "failed":  # too few examples
                assert time.time() < deadline
                time.sleep(0.2)
        before = snapshot(root)
        second = serve_once(root, free_port(), cache_dir)
        assert second.returncode != 0
        assert f"pid {first.pid} at http://127.0.0.1:{port_of(url.removesuffix('/v1'))}" in second.stdout, second.stdout
        assert "one server per jobs_root" in second.stdout
        assert snapshot(root) == before  # no recovery, no index writes, nothing
        assert httpx.get(f"{url}/models").status_code == 200  # the first keeps serving
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    with serve_process(root, overrides(cache_dir)) as (url, third):
        assert httpx.get(f"{url}/fine_tuning/jobs/{job['id']}").json()["status"] == "failed"


def test_a_server_whose_port_is_taken_exits_before_touching_its_root(tmp_path, cache_dir):
    with serve_process(tmp_path / "first", overrides(cache_dir)) as (url, first):
        port = port_of(url.removesuffix("/v1"))
        other = tmp_path / "second"
        second = serve_once(other, port, cache_dir)
        assert second.returncode != 0
        assert f"cannot listen on 127.0.0.1:{port}" in second.stdout and "server.port" in second.stdout, second.stdout
        assert not other.exists()  # not created, let alone recovered
        wait_ready(url)  # the first keeps serving
