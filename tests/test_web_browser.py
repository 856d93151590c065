"""The web chat page in headless Chromium (Debian's chromium + chromium-driver, driven by Selenium) against a
real `tokenmill serve` of the default model: a reply streams in, Stop aborts it and the server frees the
request (`/metrics`), settings and the API key reach the request, the server's errors show in the page, and
the layout holds at phone width. Screenshots go to test-artifacts/web/.

`make test` installs chromium where it may (root or passwordless sudo); without it this module skips and
says why (`pytest -rs`). Run alone: `pytest -rs tests/test_web_browser.py`."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import httpx
import pytest
from test_server import ServerProcess, metrics

pytestmark = pytest.mark.integration

PAGE_TIMEOUT_S = 60.0


def _chromium() -> tuple[str, str]:
    """Paths of chromium and chromedriver, or skip saying what is missing."""
    browser = (
        os.environ.get("TOKENMILL_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    )
    driver = os.environ.get("TOKENMILL_CHROMEDRIVER") or shutil.which("chromedriver")
    if browser is None or driver is None:
        missing = " and ".join(n for n, p in (("chromium", browser), ("chromedriver", driver)) if p is None)
        pytest.skip(
            f"{missing} not installed (Debian: apt-get install chromium chromium-driver; `make test` does it as root)"
        )
    return browser, driver


@pytest.fixture(scope="module")
def artifacts(request) -> Path:
    folder = (
        Path(os.environ.get("TOKENMILL_TEST_ARTIFACTS", request.config.rootpath / "test-artifacts")) / "web"
    )
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    browser, chromedriver = _chromium()
    webdriver = pytest.importorskip(
        "selenium.webdriver", reason="selenium is not installed (pip install selenium)"
    )
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in (
        "--headless=new",
        "--no-sandbox",  # root in CI
        "--disable-gpu",
        "--disable-dev-shm-usage",
        # No background connections: this machine has no network beyond its package mirrors.
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-quic",
        "--no-first-run",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",
        "--window-size=1280,900",
    ):
        options.add_argument(arg)
    # The requests the page sends, and its console (script errors, CSP violations).
    options.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    try:
        drv = webdriver.Chrome(service=Service(executable_path=chromedriver), options=options)
    except Exception as exc:  # a browser that cannot start here is a skip, with the reason
        reason = " ".join(str(getattr(exc, "msg", None) or exc).split("Stacktrace:")[0].split())
        pytest.skip(f"chromium did not start: {type(exc).__name__}: {reason[:400]}")
    drv.set_script_timeout(30)
    yield drv
    drv.quit()


@pytest.fixture(scope="module")
def server(driver, tmp_path_factory):
    """The default model, as `tokenmill serve` runs it (started after the browser, so that a skip is cheap)."""
    with ServerProcess(None, tmp_path_factory.mktemp("web-srv") / "server.log") as srv:
        yield srv
        assert srv.proc.poll() is None, f"server died:\n{srv.log()[-5000:]}"


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


@pytest.fixture(autouse=True)
def screenshot_on_failure(request, driver, artifacts):
    """A failing test leaves the page as it was, for CI's artifacts."""
    failed = request.session.testsfailed
    yield
    if request.session.testsfailed > failed:
        driver.save_screenshot(str(artifacts / f"failed-{request.node.name}.png"))


# ---- helpers --------------------------------------------------------------------------------------------
def wait_for(predicate, timeout: float = PAGE_TIMEOUT_S, interval: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def open_page(driver, server) -> None:
    driver.get(server.url + "/")
    wait_for(
        lambda: driver.execute_script("return document.getElementById('model').dataset.ready"), what="model"
    )


def set_field(driver, element_id: str, value: str) -> None:
    """Set an input as a user would have (value + change event), whatever it held."""
    driver.execute_script(
        "const el = document.getElementById(arguments[0]); el.value = arguments[1];"
        "el.dispatchEvent(new Event('change', {bubbles: true}));",
        element_id,
        value,
    )


def send(driver, text: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    box = driver.find_element(By.ID, "prompt")
    box.send_keys(text)
    box.send_keys(Keys.ENTER)


def last_reply(driver) -> dict:
    """The last assistant message: state, text, stats line and its data attributes."""
    return driver.execute_script(
        "const m = [...document.querySelectorAll('.msg.assistant')].pop(); if (!m) return null;"
        "const s = m.querySelector('.stats'); const e = m.querySelector('.error-text');"
        "const c = m.querySelector('.body pre code');"
        "return {state: m.dataset.state, text: m.querySelector('.body').textContent,"
        " html: m.querySelector('.body').innerHTML, stats: s.textContent, ttft: s.dataset.ttftMs || null,"
        " finish: s.dataset.finish || null, error: e ? e.textContent : null, code: c ? c.textContent : null};"
    )


def chat_requests(driver) -> list[dict]:
    """The POSTs to /v1/chat/completions the browser sent since the last call (Chrome's performance log)."""
    sent = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] != "Network.requestWillBeSent":
            continue
        request = message["params"]["request"]
        if request["url"].endswith("/v1/chat/completions") and request["method"] == "POST":
            sent.append(request)
    return sent


def header(request: dict, name: str) -> str | None:
    return next((v for k, v in request["headers"].items() if k.lower() == name.lower()), None)


def settle(http: httpx.Client, aborts: float) -> dict[str, float]:
    """/metrics once the engine holds no request and no KV block, and `aborts` requests were aborted."""

    def freed() -> dict[str, float] | None:
        m = metrics(http)
        done = (
            m["tokenmill_num_requests_running"] == 0
            and m["tokenmill_num_requests_waiting"] == 0
            and m["tokenmill_kv_blocks_used"] == 0
            and m['tokenmill_requests_total{outcome="abort"}'] == aborts
        )
        return m if done else None

    return wait_for(freed, timeout=15, interval=0.1, what=f"the server to free its requests: {metrics(http)}")


# ---- tests ------------------------------------------------------------------------------------------------
def test_reply_streams_and_stop_frees_the_request(driver, server, http, artifacts):
    open_page(driver, server)
    served = http.get("/v1/models").json()["data"][0]["id"]
    assert driver.execute_script("return document.getElementById('model').textContent") == served
    set_field(driver, "temperature", "0")
    set_field(driver, "max-tokens", "48")
    set_field(driver, "seed", "")
    chat_requests(driver)

    # A reply streams: its text grows over several renders before the reply is done.
    send(driver, "List five fruits as a markdown list, each with a one-sentence description.")
    lengths = []
    deadline = time.monotonic() + PAGE_TIMEOUT_S
    while time.monotonic() < deadline:
        reply = last_reply(driver)
        if reply is None:
            time.sleep(0.02)
            continue
        if reply["state"] != "streaming":
            break
        if not lengths or len(reply["text"]) != lengths[-1]:
            lengths.append(len(reply["text"]))
        time.sleep(0.02)
    assert reply["state"] == "done", reply
    assert len(reply["text"]) > 0 and reply["error"] is None
    # Seen at >= 3 lengths while streaming, shorter than at the end. (Rendered text may shrink for a moment,
    # when a closing ** turns "**bold" into "bold", so growth is not required between every two samples.)
    growing = [n for n in lengths if n > 0]
    assert len(set(growing)) >= 3 and min(growing) < len(reply["text"]), lengths
    assert "TTFT" in reply["stats"] and "tok/s" in reply["stats"] and int(reply["ttft"]) > 0, reply
    assert reply["finish"] in ("stop", "length"), reply
    (request,) = chat_requests(driver)
    assert header(request, "Content-Type") == "application/json" and header(request, "Authorization") is None
    body = json.loads(request["postData"])
    assert body["stream"] is True and body["model"] == served and body["temperature"] == 0
    assert body["max_tokens"] == 48 and "seed" not in body and body["messages"][-1]["role"] == "user"
    driver.save_screenshot(str(artifacts / "reply.png"))

    # Stop mid-way: the page shows it stopped, the text stops growing, and the server frees the request.
    aborts = metrics(http)['tokenmill_requests_total{outcome="abort"}']
    set_field(driver, "max-tokens", "1500")
    send(driver, "Write a very long story about a dragon who learns to cook, with many chapters.")
    wait_for(
        lambda: (r := last_reply(driver)) and r["state"] == "streaming" and len(r["text"]) >= 30,
        what="the long reply to stream",
    )
    assert metrics(http)["tokenmill_num_requests_running"] == 1
    driver.find_element("id", "stop").click()
    stopped = wait_for(lambda: (r := last_reply(driver)) and r["state"] != "streaming" and r, what="stop")
    assert stopped["state"] == "stopped" and stopped["stats"].startswith("stopped"), stopped
    m = settle(http, aborts + 1)
    assert m["tokenmill_kv_tokens_held"] == 0
    time.sleep(0.3)
    assert last_reply(driver)["text"] == stopped["text"]
    assert driver.execute_script("return document.getElementById('send').hidden") is False
    driver.save_screenshot(str(artifacts / "stopped.png"))
    severe = [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert not severe, severe  # no script error, no blocked resource

    # The conversation goes on after a stop: the stopped reply is part of the context sent next.
    set_field(driver, "max-tokens", "8")
    chat_requests(driver)
    send(driver, "Thanks.")
    wait_for(lambda: last_reply(driver)["state"] == "done", what="the third reply")
    (request,) = chat_requests(driver)
    roles = [msg["role"] for msg in json.loads(request["postData"])["messages"]]
    assert roles == ["user", "assistant", "user", "assistant", "user"], roles


def test_settings_api_key_and_json_schema_errors(driver, server, http, artifacts):
    open_page(driver, server)
    set_field(driver, "system-prompt", "You answer in one word.")
    set_field(driver, "max-tokens", "64")
    set_field(driver, "seed", "7")
    set_field(driver, "api-key", "sk-page-test")
    wait_for(
        lambda: driver.execute_script("return document.getElementById('model').dataset.ready"), what="model"
    )
    driver.find_element("id", "json-mode").click()
    assert driver.find_element("id", "schema").is_displayed()

    # A schema that is not JSON is caught in the page, before anything is sent.
    set_field(driver, "schema", "{not json")
    chat_requests(driver)
    send(driver, "Give an answer.")
    error = wait_for(
        lambda: driver.execute_script(
            "const e = [...document.querySelectorAll('.msg.error .body')].pop(); return e && e.textContent;"
        ),
        what="the schema error",
    )
    assert "The JSON schema is not valid JSON" in error
    assert chat_requests(driver) == []
    assert driver.execute_script("return document.getElementById('prompt').value") == "Give an answer."

    # A valid schema goes out as response_format; whatever the server answers is what the page shows.
    schema = {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]}
    set_field(driver, "schema", json.dumps(schema))
    set_field(driver, "prompt", "")
    send(driver, "Give an answer.")
    reply = wait_for(lambda: (r := last_reply(driver)) and r["state"] != "streaming" and r, what="reply")
    (request,) = chat_requests(driver)
    assert header(request, "Authorization") == "Bearer sk-page-test"
    assert header(request, "Content-Type") == "application/json"
    body = json.loads(request["postData"])
    assert body["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "reply", "schema": schema},
    }
    assert body["messages"][0] == {"role": "system", "content": "You answer in one word."}
    assert body["seed"] == 7 and body["max_tokens"] == 64
    plain = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
    direct = http.post("/v1/chat/completions", json=plain)
    if direct.status_code != 200:  # the server refuses the schema: the page shows its own message
        assert reply["state"] == "error", reply
        err = direct.json()["error"]
        assert f"HTTP {direct.status_code}: {err['message']}" in reply["error"], (reply, err)
    else:  # the server constrains the reply: it is JSON of that schema
        assert reply["state"] == "done" and reply["error"] is None, reply
        if reply["finish"] == "stop":
            assert isinstance(json.loads(reply["code"])["answer"], str), reply  # shown as a JSON block
    driver.save_screenshot(str(artifacts / "json-schema.png"))
    driver.find_element("id", "json-mode").click()
    set_field(driver, "api-key", "")
    set_field(driver, "system-prompt", "")


def test_phone_width_layout_and_safe_markdown(driver, server, artifacts):
    driver.set_window_size(390, 844)
    try:
        open_page(driver, server)
        width = driver.execute_script("return [document.documentElement.scrollWidth, window.innerWidth]")
        assert width[0] <= width[1], width  # nothing wider than the screen
        settings = driver.find_element("id", "settings")
        assert not settings.is_displayed()  # at phone width settings open on demand, over the chat
        driver.find_element("id", "toggle-settings").click()
        assert settings.is_displayed()
        driver.find_element("id", "toggle-settings").click()
        assert not settings.is_displayed()

        # Model text can never become markup: the renderer the page uses, given hostile text.
        hostile = (
            '<img src=x onerror="window.__owned=1"> **bold**\n```html\n<script>window.__owned=2</script>\n```'
        )
        result = driver.execute_script(
            "const d = document.createElement('div'); d.className = 'md';"
            "d.innerHTML = TokenmillMarkdown.render(arguments[0]); document.body.append(d);"
            "const r = {img: d.querySelectorAll('img, script').length, strong: d.querySelector('strong').textContent,"
            " code: d.querySelector('pre code').textContent}; d.remove(); return r;",
            hostile,
        )
        assert result == {"img": 0, "strong": "bold", "code": "<script>window.__owned=2</script>"}, result
        time.sleep(0.2)
        assert driver.execute_script("return window.__owned === undefined")

        set_field(driver, "max-tokens", "96")
        set_field(driver, "temperature", "0")
        send(driver, "Show a Python function that adds two numbers, in a code block.")
        wait_for(lambda: (r := last_reply(driver)) and r["state"] == "done", what="reply")
        width = driver.execute_script("return [document.documentElement.scrollWidth, window.innerWidth]")
        assert width[0] <= width[1], width
        driver.save_screenshot(str(artifacts / "phone.png"))
    finally:
        driver.set_window_size(1280, 900)
