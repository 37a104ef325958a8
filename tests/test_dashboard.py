"""The dashboard of `ftlab serve` in a real browser: Debian's chromium, driven by Playwright, against a live
server on the tiny Llama. Upload a file and see its validation (a planted error shows its line), create a
job and watch it finish (progress, charts, checkpoints, events, downloads), pause/resume/cancel, two
streamed answers in the playground, the key prompt (a wrong key is refused and asked again), labelled
controls and no horizontal scroll at phone width.

Needs chromium:  apt-get install -y chromium  (as root; `.ci/run` does it). Without it these tests are
skipped with that message, or fail where FTLAB_REQUIRE_BROWSER=1 (as in CI).
`FTLAB_SCREENSHOTS=docs pytest tests/test_dashboard.py -k screenshots` remakes the README's screenshots
(on the embedded SmolLM2).
"""
import io
import os
import re
import shutil
import time
import warnings
import zipfile
from pathlib import Path

import httpx
import pytest

from tests.conftest import chat_example, write_jsonl
from tests.live_server import live_server
from trainer.data.validate import FIXES

INSTALL = "apt-get install -y chromium  (as root; .ci/run does it) and pip install -e '.[dev]' (playwright)"


def _chromium():
    for candidate in (os.environ.get("FTLAB_CHROMIUM"), shutil.which("chromium"), shutil.which("chromium-browser"),
                      "/usr/bin/chromium"):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


CHROMIUM = _chromium()
try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:  # pragma: no cover - dev extra not installed
    sync_playwright = None
_missing = ("chromium is not installed" if CHROMIUM is None else "playwright is not installed"
            if sync_playwright is None else None)
if _missing:
    _reason = f"dashboard browser tests need a browser: {_missing}. Install: {INSTALL}"
    if os.environ.get("FTLAB_REQUIRE_BROWSER"):
        pytest.fail(_reason, pytrace=False)
    warnings.warn(_reason)
    pytest.skip(_reason, allow_module_level=True)

TERMINAL = ("succeeded", "failed", "cancelled")
MAX_STEPS = 4


def overrides(cache_dir: str, *extra: str) -> list[str]:
    return ["backbone=tiny-llama", "logger=none", "train.device=cpu", "train.precision=fp32", f"cache_dir={cache_dir}",
            "moderation=off", "train.checkpoint_every=2", f"train.max_steps={MAX_STEPS}", *extra]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dashboard-data")
    good = write_jsonl(folder / "train.jsonl", [chat_example(f"What is {i} + {i}?", str(2 * i)) for i in range(12)])
    valid = write_jsonl(folder / "valid.jsonl", [chat_example(f"What is {i} + 1?", str(i + 1)) for i in range(4)])
    rows = [chat_example(f"q{i}", f"a{i}") for i in range(12)]
    rows[2] = {"messages": [{"role": "user", "content": "no reply"}]}  # line 3: no assistant message
    rows[4] = '{"messages": [oops'  # line 5: not JSON
    bad = write_jsonl(folder / "bad.jsonl", rows)
    return {"good": good, "valid": valid, "bad": bad}


@pytest.fixture(scope="module")
def served(tmp_path_factory, cache_dir):
    with live_server(tmp_path_factory.mktemp("dashboard") / "root", overrides(cache_dir)) as (url, server):
        yield url.removesuffix("/v1"), server


@pytest.fixture(scope="module")
def http(served):
    with httpx.Client(base_url=served[0], headers={"Authorization": "Bearer x"}, timeout=60) as client:
        yield client


def wait_job(http, job_id: str, statuses=TERMINAL, timeout: float = 150) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = http.get(f"/v1/fine_tuning/jobs/{job_id}").json()
        if job["status"] in statuses:
            return job
        time.sleep(0.3)
    raise TimeoutError(f"{job_id} is still {job['status']}")


@pytest.fixture(scope="module")
def trained(http, files):
    """A job created through the API (not the page), finished: for the playground and the phone-width pages."""
    with open(files["good"], "rb") as handle:
        file_id = http.post("/v1/files", files={"file": ("train.jsonl", handle)}, data={"purpose": "fine-tune"}).json()["id"]
    job = http.post("/v1/fine_tuning/jobs", json={"model": "gpt-3.5-turbo", "training_file": file_id,
                                                  "suffix": "fixture"}).json()
    job = wait_job(http, job["id"])
    assert job["status"] == "succeeded", job["error"]
    return job


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    page.set_default_timeout(30_000)
    yield page
    context.close()
    assert not errors, errors  # no script errors, no refused requests, no CSP violations


def test_upload_shows_the_validation_report_with_line_numbers(page, served, files):
    page.goto(f"{served[0]}/new")
    page.set_input_files("#train-input", str(files["bad"]))
    errors = page.locator("#report .issues-errors tbody tr")
    expect(errors).to_have_count(2)
    expect(errors.nth(0)).to_contain_text("line 3")
    expect(errors.nth(0)).to_contain_text("example_missing_assistant_message")
    expect(errors.nth(0).locator('td[data-label="Fix"]')).to_have_text(FIXES["example_missing_assistant_message"])
    expect(errors.nth(1)).to_contain_text("line 5")
    expect(errors.nth(1)).to_contain_text("invalid_json")
    expect(page.locator("#verdict")).to_contain_text("10 valid example(s) of 12 line(s)")
    expect(page.locator("#submit")).to_be_disabled()  # nothing goes out that would fail
    expect(page.locator("#histogram svg rect.bar")).not_to_have_count(0)
    expect(page.locator("#estimate")).to_contain_text("Billed tokens")
    expect(page.locator("#estimate")).to_contain_text("Local: this machine")


def test_create_a_job_and_watch_it_finish(page, served, http, files):
    base, server = served
    page.goto(f"{base}/new")
    page.set_input_files("#train-input", str(files["good"]))
    expect(page.locator("#verdict")).to_contain_text("12 valid example(s)")
    expect(page.locator("#report .verdict.good")).to_be_visible()
    hosted = page.locator("#estimate table").first
    expect(hosted).to_contain_text("Epochs8")  # auto: 100 // 12 examples, the hosted rule
    page.fill("#n_epochs", "2")
    page.locator("#n_epochs").dispatch_event("change")
    expect(hosted).to_contain_text("Epochs2")
    page.set_input_files("#validation-input", str(files["valid"]))
    expect(page.locator("#estimate")).to_contain_text("Validation tokens (not billed)")
    page.fill("#suffix", "dash")
    page.click("#submit")
    page.wait_for_url(re.compile(r"/jobs/ftjob-"))
    job_id = page.url.rsplit("/", 1)[1]
    expect(page.locator("#job-id")).to_have_text(job_id)
    expect(page.locator("#status")).to_have_text("succeeded", timeout=150_000)
    job = http.get(f"/v1/fine_tuning/jobs/{job_id}").json()
    assert job["hyperparameters"]["n_epochs"] == 2 and job["validation_file"]
    expect(page.locator("#ft-model")).to_contain_text(job["fine_tuned_model"])
    expect(page.locator("#progress-label")).to_contain_text(f"step {MAX_STEPS} of {MAX_STEPS}")
    batch = page.locator("#hyperparameters tbody tr", has_text="batch_size").locator("td")
    expect(batch).to_have_text(["auto", str(job["hyperparameters"]["batch_size"])])  # asked auto, resolved
    expect(page.locator("#estimate")).to_contain_text("Hosted price")

    # the charts, drawn from results.csv: one point a step, validation loss where it was measured
    train_loss = page.locator('#loss-chart path.line[data-series="training loss"]')
    expect(train_loss).to_have_attribute("d", re.compile(r"^M[\d.]+,[\d.]+(L[\d.]+,[\d.]+){%d}$" % (MAX_STEPS - 1)))
    expect(page.locator('#loss-chart path.line[data-series="validation loss"]')).to_have_attribute("d", re.compile("^M"))
    expect(page.locator('#accuracy-chart path.line[data-series="training token accuracy"]')).to_have_attribute(
        "d", re.compile("L"))
    expect(page.locator("#loss-chart path.raw")).not_to_have_count(0)  # smoothing on: raw + smoothed
    page.eval_on_selector("#smoothing", "e => { e.value = '0'; e.dispatchEvent(new Event('input')); }")
    expect(page.locator("#loss-chart path.raw")).to_have_count(0)
    expect(page.locator("#histogram svg rect.bar")).not_to_have_count(0)

    # checkpoints with the API's names, events, links and downloads
    checkpoints = http.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints").json()["data"]
    names = page.locator("#checkpoints code.model-code")
    expect(names).to_have_text([c["fine_tuned_model_checkpoint"] for c in checkpoints])
    expect(page.locator("#events")).to_contain_text("The job has successfully completed")
    expect(page.locator("#playground")).to_have_attribute("href", re.compile(re.escape("model=ft%3Agpt-3.5-turbo")))
    with page.expect_download() as download:
        page.click("#download-results")
    assert Path(download.value.path()).read_text().startswith("step,train_loss,train_accuracy")
    with page.expect_download() as download:
        page.click("#download-adapter")
    with zipfile.ZipFile(io.BytesIO(Path(download.value.path()).read_bytes())) as archive:
        assert any(name.endswith("adapter_config.json") for name in archive.namelist())
    assert not page.locator("#cancel").is_enabled() and not page.locator("#resume").is_enabled()

    # the jobs list shows it, filters by status and pages like the API
    page.goto(f"{base}/")
    row = page.locator(f'tr[data-job="{job_id}"]')
    expect(row).to_contain_text("succeeded")
    expect(row).to_contain_text(job["fine_tuned_model"])
    expect(row.locator('td[data-label="Trained tokens"]')).to_have_text(f"{job['trained_tokens']:,}")
    page.select_option("#status", "failed")
    expect(row).to_have_count(0)
    page.select_option("#status", "succeeded")
    expect(row).to_have_count(1)
    assert "status=succeeded" in page.url
    page.select_option("#status", "")
    page.select_option("#limit", "10")
    api_ids = [j["id"] for j in http.get("/v1/fine_tuning/jobs", params={"limit": 10}).json()["data"]]
    expect(page.locator("#jobs tbody tr")).to_have_count(len(api_ids))


def test_new_reinforcement_job_validates_and_tries_its_grader(page, served, http, tmp_path):
    line = lambda i: {"messages": [{"role": "user", "content": f"What is {i} + {i}?"}], "answer": str(2 * i)}  # noqa: E731
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [line(i) for i in range(10)])
    held = write_jsonl(tmp_path / "held.jsonl", [line(i) for i in range(3)])
    page.goto(f"{served[0]}/new")
    page.set_input_files("#train-input", str(prompts))
    expect(page.locator("#method")).to_have_value("reinforcement")  # from the file's first line
    expect(page.locator("#verdict")).to_contain_text("10 valid example(s)")
    expect(page.locator("#grader-box")).to_be_visible()
    page.fill("#grader", '{"type": "string_check", "name": "right", "operation": "ilike", '
                         '"input": "{{sample.output_text}}", "reference": "{{item.answer}}"}')
    page.click("#grader-validate")
    expect(page.locator("#grader-result")).to_have_text("The grader is valid.")
    page.fill("#grader-sample", "It is 0.")
    page.click("#grader-try")
    expect(page.locator("#grader-result")).to_contain_text("reward 1")
    page.set_input_files("#validation-input", str(held))
    expect(page.locator("#estimate")).to_contain_text("Validation tokens (not billed)")
    page.fill("#n_epochs", "1")
    page.click("#submit")
    page.wait_for_url(re.compile(r"/jobs/ftjob-"))
    job = http.get(f"/v1/fine_tuning/jobs/{page.url.rsplit('/', 1)[1]}").json()
    assert job["method"]["type"] == "reinforcement" and job["method"]["reinforcement"]["grader"]["name"] == "right"
    assert job["method"]["reinforcement"]["hyperparameters"]["n_epochs"] == 1
    page.goto(f"{served[0]}/new")
    page.set_input_files("#train-input", str(prompts))
    expect(page.locator("#verdict")).to_contain_text("10 valid example(s)")
    page.select_option("#method", "supervised")
    expect(page.locator("#report")).to_contain_text("example_missing_assistant_message")
    expect(page.locator("#grader-box")).to_be_hidden()


def test_a_reinforcement_job_page_charts_rewards_and_shows_sampled_answers(page, served, http, tmp_path):
    line = lambda i: {"messages": [{"role": "user", "content": f"What is {i} + {i}?"}], "answer": str(2 * i)}  # noqa: E731
    ids = []
    for name, rows in (("prompts.jsonl", [line(i) for i in range(10)]), ("held.jsonl", [line(i) for i in range(3)])):
        with open(write_jsonl(tmp_path / name, rows), "rb") as handle:
            ids.append(http.post("/v1/files", files={"file": (name, handle)}, data={"purpose": "fine-tune"}).json()["id"])
    grader = {"type": "string_check", "name": "right", "operation": "ilike", "input": "{{sample.output_text}}",
              "reference": "{{item.answer}}"}
    job = http.post("/v1/fine_tuning/jobs", json={
        "model": "gpt-3.5-turbo", "training_file": ids[0], "validation_file": ids[1],
        "method": {"type": "reinforcement", "reinforcement": {"grader": grader, "hyperparameters": {
            "n_epochs": 1, "batch_size": 5, "eval_interval": 1, "compute_multiplier": 0.25}}}}).json()
    assert wait_job(http, job["id"])["status"] == "succeeded"
    page.goto(f"{served[0]}/jobs/{job['id']}")
    expect(page.locator("#rewards-panel")).to_be_visible()
    training = page.locator('#reward-chart path.line[data-series="training reward_mean"]')
    expect(training).to_have_attribute("d", re.compile(r"^M[\d.]+,[\d.]+L[\d.]+,[\d.]+$"))  # two steps
    expect(page.locator('#length-chart path.line[data-series="validation completion_tokens"]')).to_have_attribute(
        "d", re.compile("^M"))
    expect(page.locator("#samples tbody tr")).not_to_have_count(0)
    expect(page.locator("#samples tbody tr").first).to_contain_text("What is 0 + 0?")
    expect(page.locator("#accuracy-chart")).to_be_hidden()  # its column holds the mean reward, charted above
    expect(page.locator("#reward-facts")).to_contain_text("Grader errors")


def test_a_dpo_job_page_charts_reward_accuracy_and_margins(page, served, http, tmp_path):
    pairs = [{"input": {"messages": [{"role": "user", "content": f"What is {i} + {i}?"}]},
              "preferred_output": [{"role": "assistant", "content": str(2 * i)}],
              "non_preferred_output": [{"role": "assistant", "content": f"Well, {2 * i}."}]} for i in range(10)]
    with open(write_jsonl(tmp_path / "pairs.jsonl", pairs), "rb") as handle:
        file_id = http.post("/v1/files", files={"file": ("pairs.jsonl", handle)}, data={"purpose": "fine-tune"}).json()["id"]
    job = http.post("/v1/fine_tuning/jobs", json={"model": "gpt-3.5-turbo", "training_file": file_id, "method": {
        "type": "dpo", "dpo": {"hyperparameters": {"n_epochs": 1, "batch_size": 5}}}}).json()
    assert wait_job(http, job["id"])["status"] == "succeeded"
    page.goto(f"{served[0]}/new?file={file_id}")  # the new-job page knows a preference file and shows its lengths
    expect(page.locator("#method")).to_have_value("dpo")
    for length in ("prompt tokens", "non-preferred tokens"):
        expect(page.locator("#report table.stats")).to_contain_text(length)
    page.goto(f"{served[0]}/jobs/{job['id']}")
    expect(page.locator("#preference-panel")).to_be_visible()
    expect(page.locator('#preference-accuracy-chart path.line[data-series="training reward accuracy"]')).to_have_attribute(
        "d", re.compile(r"^M[\d.]+,[\d.]+L"))
    expect(page.locator('#preference-reward-chart path.line[data-series="training reward margin"]')).to_have_attribute(
        "d", re.compile("^M"))
    expect(page.locator("#rewards-panel")).to_be_hidden()


def test_pause_resume_and_cancel_from_the_job_page(page, served, http, files):
    base, _ = served
    with open(files["good"], "rb") as handle:
        file_id = http.post("/v1/files", files={"file": ("t.jsonl", handle)}, data={"purpose": "fine-tune"}).json()["id"]
    job_id = http.post("/v1/fine_tuning/jobs", json={"model": "gpt-3.5-turbo", "training_file": file_id}).json()["id"]
    wait_job(http, job_id, ("queued", "running"), timeout=30)
    page.goto(f"{base}/jobs/{job_id}")
    page.click("#pause")
    expect(page.locator("#status")).to_have_text("paused", timeout=60_000)
    expect(page.locator("#resume")).to_be_enabled()
    page.click("#resume")
    expect(page.locator("#status")).not_to_have_text("paused")
    page.click("#cancel")
    expect(page.locator("#status")).to_have_text("cancelled", timeout=60_000)
    expect(page.locator("#events")).to_contain_text("Fine-tuning job cancelled")
    assert http.get(f"/v1/fine_tuning/jobs/{job_id}").json()["status"] == "cancelled"


def test_playground_streams_two_answers_side_by_side(page, served, http, trained):
    checkpoint = http.get(f"/v1/fine_tuning/jobs/{trained['id']}/checkpoints").json()["data"][-1]
    name = checkpoint["fine_tuned_model_checkpoint"]
    page.goto(f"{served[0]}/playground?model={trained['fine_tuned_model']}")
    expect(page.locator("#model-b")).to_have_value(trained["fine_tuned_model"])
    expect(page.locator("#model-a")).to_have_value("gpt-3.5-turbo")
    assert page.locator(f'#models option[value="{name}"]').count() == 1  # checkpoints are offered too
    page.fill("#model-a", name)
    page.fill("#system", "Reply briefly.")
    page.fill("#user", "What is 3 + 3?")
    page.fill("#max-tokens", "8")
    page.locator("#user").press("Control+Enter")
    for side in ("a", "b"):
        expect(page.locator(f"#out-{side}")).to_have_attribute("data-done", "true", timeout=60_000)
        expect(page.locator(f"#stats-{side}")).to_contain_text("completion tokens")
        expect(page.locator(f"#stats-{side}")).to_contain_text("tokens/s")
    messages = [{"role": "system", "content": "Reply briefly."}, {"role": "user", "content": "What is 3 + 3?"}]
    for side, model in (("a", name), ("b", trained["fine_tuned_model"])):
        reply = http.post("/v1/chat/completions", json={"model": model, "messages": messages, "max_tokens": 8,
                                                        "temperature": 0}).json()
        assert page.locator(f"#out-{side}").text_content() == (reply["choices"][0]["message"]["content"] or "(empty answer)")
        expect(page.locator(f"#stats-{side}")).to_contain_text(f"{reply['usage']['completion_tokens']} completion tokens")


def test_the_key_is_asked_for_and_a_wrong_one_is_refused(browser, tmp_path, cache_dir):
    with live_server(tmp_path / "root", overrides(cache_dir), api_key="sk-dash") as (url, _):
        base = url.removesuffix("/v1")
        shell = httpx.get(f"{base}/")  # the page is a shell; its data needs the key
        assert shell.status_code == 200 and "default-src 'self'" in shell.headers["content-security-policy"]
        assert httpx.get(f"{base}/static/js/api.js").headers["content-type"].startswith("text/javascript")
        assert httpx.get(f"{base}/static/%2e%2e/api.py").status_code == 404  # nothing outside static/
        assert httpx.get(f"{base}/ui/api/jobs").status_code == 401
        assert httpx.get(f"{base}/ui/api/jobs", headers={"Authorization": "Bearer nope"}).status_code == 401
        context = browser.new_context()
        page = context.new_page()
        page.goto(f"{base}/")
        dialog = page.locator("#key-dialog")
        expect(dialog).to_be_visible()
        page.fill("#key-input", "wrong-key")
        page.keyboard.press("Enter")
        expect(page.locator("#key-message")).to_contain_text("refused")
        expect(dialog).to_be_visible()
        page.fill("#key-input", "sk-dash")
        page.click("#key-save")
        expect(dialog).to_be_hidden()
        expect(page.locator("#empty")).to_be_visible()  # the jobs list loaded: no jobs yet
        assert page.evaluate("localStorage.getItem('ftlab.apiKey')") == "sk-dash"
        page.goto(f"{base}/files")  # asked once: the next page uses the stored key
        expect(page.locator("#empty")).to_be_visible()
        expect(dialog).to_be_hidden()
        context.close()


def test_phone_width_labels_and_no_horizontal_scroll(browser, served, trained):
    base, _ = served
    context = browser.new_context(viewport={"width": 360, "height": 780}, is_mobile=True)
    page = context.new_page()
    pages = {"/": "#jobs tbody tr", f"/jobs/{trained['id']}": "#checkpoints tbody tr",
             f"/new?file={trained['training_file']}": "#report table", "/playground": "#models option",
             "/files": "#files tbody tr"}
    for path, ready in pages.items():
        page.goto(f"{base}{path}")
        page.locator(ready).first.wait_for(state="attached")
        page.wait_for_timeout(300)
        width = page.evaluate("[document.documentElement.scrollWidth, window.innerWidth]")
        assert width[0] <= width[1], f"{path} scrolls sideways at phone width: {width}"
        unlabelled = page.evaluate("""[...document.querySelectorAll('input, select, textarea')]
            .filter(e => e.type !== 'hidden' && !e.hidden && !e.labels.length && !e.getAttribute('aria-label'))
            .map(e => e.id || e.name)""")
        assert unlabelled == [], f"{path}: controls without a label: {unlabelled}"
    page.goto(f"{base}/")  # keyboard: the skip link comes first and leads to the content
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.textContent") == "Skip to content"
    context.close()


@pytest.mark.skipif(not os.environ.get("FTLAB_SCREENSHOTS"), reason="set FTLAB_SCREENSHOTS=<folder> to remake them")
def test_screenshots(browser, tmp_path):
    """The README's screenshots: a 60-step job on the embedded SmolLM2 with the json_output sample."""
    from trainer.paths import resolve_data_path

    folder = Path(os.environ["FTLAB_SCREENSHOTS"])
    folder.mkdir(parents=True, exist_ok=True)
    args = ["logger=none", "moderation=off", "train.max_steps=60", "train.eval_every=5", "train.checkpoint_every=20"]
    with live_server(tmp_path / "root", args) as (url, _):
        base = url.removesuffix("/v1")
        http = httpx.Client(base_url=base, timeout=120)
        ids = []
        for kind in ("train", "validation"):
            path = resolve_data_path(f"sample://json_output/{kind}.jsonl")
            with open(path, "rb") as handle:
                ids.append(http.post("/v1/files", files={"file": (f"{kind}.jsonl", handle)},
                                     data={"purpose": "fine-tune"}).json()["id"])
        bad = write_jsonl(tmp_path / "contacts-v0.jsonl", [chat_example(f"q{i}", f"a{i}") for i in range(5)])
        with open(bad, "rb") as handle:  # a job the hosted rules fail: fewer than 10 examples
            few = http.post("/v1/files", files={"file": (bad.name, handle)}, data={"purpose": "fine-tune"}).json()["id"]
        http.post("/v1/fine_tuning/jobs", json={"model": "gpt-3.5-turbo", "training_file": few, "suffix": "v0"})
        job = http.post("/v1/fine_tuning/jobs", json={"model": "gpt-3.5-turbo", "training_file": ids[0],
                                                      "validation_file": ids[1], "suffix": "contacts"}).json()
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        page = context.new_page()
        page.goto(f"{base}/jobs/{job['id']}")
        expect(page.locator("#status")).to_have_text("succeeded", timeout=900_000)
        page.wait_for_timeout(1000)
        page.screenshot(path=folder / "dashboard-job.png", full_page=True)
        later = http.post("/v1/fine_tuning/jobs", json={"model": "gpt-3.5-turbo", "training_file": ids[0],
                                                        "suffix": "contacts-2", "hyperparameters": {"n_epochs": 5}})
        wait_job(http, later.json()["id"], ("queued", "running"), timeout=60)
        http.post(f"/v1/fine_tuning/jobs/{later.json()['id']}/pause")
        page.goto(f"{base}/")
        page.locator("#jobs tbody tr").nth(2).wait_for()
        page.wait_for_timeout(2500)
        page.screenshot(path=folder / "dashboard-jobs.png")
        done = http.get(f"/v1/fine_tuning/jobs/{job['id']}").json()
        page.goto(f"{base}/playground?model={done['fine_tuned_model']}")
        page.fill("#system", "Extract the contact as JSON.")
        page.fill("#user", "Hugo Alvarez | Maple Ridge Dental | Porto | hugo@example.com")
        page.click("#run")
        for side in ("a", "b"):
            expect(page.locator(f"#out-{side}")).to_have_attribute("data-done", "true", timeout=300_000)
        page.screenshot(path=folder / "dashboard-playground.png", full_page=True)
        page.goto(f"{base}/new?file={ids[0]}")
        page.locator("#estimate table").first.wait_for()
        page.screenshot(path=folder / "dashboard-new.png", full_page=True)
        context.close()
