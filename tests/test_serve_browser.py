"""The chat page at / in a real browser: headless Chromium (Debian's `chromium` and
`chromium-driver`) driven by selenium types messages and waits for the streamed replies. The
page's fetch is wrapped to record each request's headers and body (RECORD_REQUESTS); the server's
side is read from its /metrics."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time

import pytest

from test_serve import MODEL_NAME, running_server

pytestmark = [pytest.mark.slow, pytest.mark.real_model, pytest.mark.multiproc]

APT_PACKAGES = ["chromium", "chromium-driver"]


def chromium_and_driver() -> tuple[str, str]:
    """Paths of chromium and chromedriver, installed with apt-get when missing and allowed."""
    found = shutil.which("chromium"), shutil.which("chromedriver")
    if all(found):
        return found
    install = "apt-get install -y " + " ".join(APT_PACKAGES)
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip(f"needs headless Chromium and its driver; as root on Debian: {install}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", *APT_PACKAGES]):
        try:
            done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
        except subprocess.TimeoutExpired:
            pytest.skip(f"{' '.join(command)} took more than 15 minutes")
        if done.returncode != 0:
            pytest.skip(f"{' '.join(command)} failed: {done.stderr.strip()[-300:]}")
    found = shutil.which("chromium"), shutil.which("chromedriver")
    if not all(found):
        pytest.skip(f"{install} did not provide chromium and chromedriver")
    return found


@pytest.fixture
def browser():
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    chromium, driver_path = chromium_and_driver()
    options = Options()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    # an explicit driver path: selenium then never tries to download one
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    yield driver
    driver.quit()


def test_chat_page_shows_a_streamed_reply(browser, smollm2_gguf, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    with running_server(smollm2_gguf, tmp_path, "--max-batch", "2", "--context", "512") as url:
        browser.get(url + "/")
        WebDriverWait(browser, 30).until(lambda d: d.find_element(By.ID, "model").text == "smol")
        fill(browser, temperature="0", max_tokens="24")
        browser.find_element(By.ID, "prompt").send_keys("What is the capital of France?")
        browser.find_element(By.ID, "send").click()

        def reply(d):
            errors = d.find_elements(By.CSS_SELECTOR, ".message.error")
            if errors:
                raise AssertionError(f"the page shows an error: {errors[0].text}")
            done = d.find_elements(By.CSS_SELECTOR, ".message.assistant.done")
            return done[0].text.strip() if done else False

        text = WebDriverWait(browser, 90).until(reply)
        assert text
        user = browser.find_elements(By.CSS_SELECTOR, ".message.user")
        assert [u.text for u in user] == ["What is the capital of France?"]


# ---- the chat client against a server that wants a key ------------------------------------------

KEY = "open-sesame"
AUTH = {"Authorization": f"Bearer {KEY}"}

# Wraps the page's fetch: each request's url, headers and JSON body land in window.__requests.
RECORD_REQUESTS = """
window.__requests = [];
const realFetch = window.fetch;
window.fetch = (url, init) => {
  init = init || {};
  window.__requests.push({url: String(url), headers: init.headers || {},
                          body: init.body ? JSON.parse(init.body) : null});
  return realFetch(url, init);
};
"""


@pytest.fixture(scope="module")
def keyed_server(smollm2_gguf, tmp_path_factory):
    # eager decoding (--no-compile): a background compilation would only compete for the CPU
    with running_server(smollm2_gguf, tmp_path_factory.mktemp("page"), "--api-key", KEY, "--max-batch", "2",
                        "--context", "512", "--no-compile") as url:
        yield url


def fill(driver, **fields) -> None:
    """Types into the settings (opened if closed): system, temperature, max_tokens, api_key."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    if driver.find_element(By.ID, "settings").get_attribute("open") is None:
        driver.find_element(By.CSS_SELECTOR, "#settings summary").click()
    for name, value in fields.items():
        box = driver.find_element(By.ID, name.replace("_", "-"))
        box.clear()
        box.send_keys(value, Keys.TAB)  # leaving the field fires its change event


def open_page(driver, url: str, key: str | None = KEY, **fields):
    """The page with its requests recorded, the key typed in (the model list then loads) and
    the given settings."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url + "/")
    driver.execute_script(RECORD_REQUESTS)
    if key is not None:
        fill(driver, api_key=key)
        if key == KEY:
            WebDriverWait(driver, 30).until(lambda d: d.find_element(By.ID, "model").text == MODEL_NAME)
    fill(driver, **fields)


def say(driver, text: str) -> None:
    from selenium.webdriver.common.by import By

    box = driver.find_element(By.ID, "prompt")
    box.clear()
    box.send_keys(text)
    driver.find_element(By.ID, "send").click()


def wait_done(driver, count: int, timeout: float = 90) -> str:
    """The text of the count-th finished reply, once there is one; an error as the newest
    message fails."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def reply(d):
        newest = d.find_elements(By.CSS_SELECTOR, "#messages > .message")[-1]
        if "error" in newest.get_attribute("class").split():
            raise AssertionError(f"the page shows an error: {newest.text}")
        done = d.find_elements(By.CSS_SELECTOR, ".message.assistant.done")
        return done[count - 1].text if len(done) >= count else False

    return WebDriverWait(driver, timeout).until(reply)


def chat_requests(driver) -> list[dict]:
    return [r for r in driver.execute_script("return window.__requests")
            if r["url"].endswith("/v1/chat/completions")]


def metric(url: str, name: str) -> float:
    import httpx

    text = httpx.get(url + "/metrics", headers=AUTH, timeout=10).text
    found = re.search(rf"^{name}(?:_total)? (\S+)$", text, re.M)
    assert found, f"/metrics has no {name}"
    return float(found.group(1))


def test_each_turn_sends_the_whole_conversation_and_new_chat_clears_it(browser, keyed_server):
    from selenium.webdriver.common.by import By

    open_page(browser, keyed_server, temperature="0", max_tokens="12")
    say(browser, "What is the capital of France?")
    first = wait_done(browser, 1)
    hits = metric(keyed_server, "camelid_prefix_cache_hits")
    say(browser, "And of Italy?")
    wait_done(browser, 2)
    one, two = chat_requests(browser)
    assert one["body"]["messages"] == [{"role": "user", "content": "What is the capital of France?"}]
    assert two["body"]["messages"] == [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": first},
        {"role": "user", "content": "And of Italy?"}]
    assert two["body"]["stream"] is True and two["body"]["stream_options"] == {"include_usage": True}
    # the server found the first turn's blocks again
    assert metric(keyed_server, "camelid_prefix_cache_hits") > hits

    browser.find_element(By.ID, "new-chat").click()
    assert browser.find_elements(By.CSS_SELECTOR, "#messages > *") == []
    say(browser, "Hello")
    wait_done(browser, 1)
    assert chat_requests(browser)[2]["body"]["messages"] == [{"role": "user", "content": "Hello"}]


def test_settings_reach_the_request_and_the_reply_shows_its_speed(browser, keyed_server):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    # a value the server refuses: its 400 message is shown, and the turn is given back
    open_page(browser, keyed_server, system="You answer in one short sentence.", temperature="5",
              max_tokens="16")
    say(browser, "Name a colour.")
    error = WebDriverWait(browser, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".message.error"))[0]
    assert error.text.startswith("error 400: ") and "temperature" in error.text
    assert browser.find_element(By.ID, "prompt").get_attribute("value") == "Name a colour."

    fill(browser, temperature="1.3")
    browser.find_element(By.ID, "send").click()
    text = wait_done(browser, 1)
    body = chat_requests(browser)[-1]["body"]
    assert body["messages"] == [{"role": "system", "content": "You answer in one short sentence."},
                                {"role": "user", "content": "Name a colour."}]
    assert body["temperature"] == 1.3 and body["max_tokens"] == 16 and body["model"] == MODEL_NAME

    stats = browser.find_element(By.CSS_SELECTOR, ".message.assistant.done + .stats").text
    found = re.fullmatch(r"(\d+\.\d) tokens/s · (\d+) tokens · first token (\d+\.\d\d) s", stats)
    assert found, f"the reply's figures read {stats!r} (reply {text!r})"
    rate, tokens, first = float(found.group(1)), int(found.group(2)), float(found.group(3))
    assert rate > 0 and 2 <= tokens <= 16 and 0 < first < 60


def test_the_api_key_is_sent_and_a_wrong_one_shows_the_servers_401(browser, keyed_server):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    open_page(browser, keyed_server, key=None, temperature="0", max_tokens="8")
    status = WebDriverWait(browser, 30).until(lambda d: d.find_element(By.ID, "status").text)
    assert "401" in status and "--api-key" in status  # the model list was refused: no key

    fill(browser, api_key="wrong")
    say(browser, "Hi")
    error = WebDriverWait(browser, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".message.error"))[0]
    assert error.text.startswith("error 401: the API key is wrong")
    assert chat_requests(browser)[0]["headers"]["Authorization"] == "Bearer wrong"

    fill(browser, api_key=KEY)
    WebDriverWait(browser, 30).until(lambda d: d.find_element(By.ID, "model").text == MODEL_NAME)
    assert browser.find_element(By.ID, "status").text == ""
    browser.find_element(By.ID, "send").click()  # the refused message went back into the box
    wait_done(browser, 1)
    last = chat_requests(browser)[-1]
    assert last["headers"]["Authorization"] == f"Bearer {KEY}"
    assert last["body"]["messages"] == [{"role": "user", "content": "Hi"}]  # the refused turn is gone
    stored = browser.execute_script("return [sessionStorage.getItem('camelid-api-key'), localStorage.length]")
    assert stored == [KEY, 0]


def test_stop_aborts_the_stream(browser, keyed_server):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    open_page(browser, keyed_server, temperature="0", max_tokens="400")
    say(browser, "Write a long story about a dragon who learns to fly, at least a thousand words.")
    reply = browser.find_element(By.CSS_SELECTOR, ".message.assistant")
    WebDriverWait(browser, 60).until(lambda d: len(reply.text) > 20)
    assert metric(keyed_server, "camelid_requests_running") == 1
    browser.find_element(By.ID, "stop").click()

    WebDriverWait(browser, 5).until(lambda d: "stopped" in reply.get_attribute("class"))
    assert not browser.find_element(By.ID, "send").get_attribute("disabled")
    assert not browser.find_element(By.ID, "stop").is_displayed()
    assert browser.find_element(By.CSS_SELECTOR, ".message.stopped + .stats").text.startswith("stopped after")
    # the server let go of the request: nothing runs, and no more tokens come
    deadline = time.monotonic() + 5
    while metric(keyed_server, "camelid_requests_running") != 0:
        assert time.monotonic() < deadline, "the server still runs the stopped request"
        time.sleep(0.1)
    generated, shown = metric(keyed_server, "camelid_generation_tokens"), reply.text
    time.sleep(1.0)
    assert metric(keyed_server, "camelid_generation_tokens") == generated and reply.text == shown

    # the stopped reply stays in the conversation as shown
    fill(browser, max_tokens="4")
    say(browser, "Thanks.")
    wait_done(browser, 1)
    assert chat_requests(browser)[-1]["body"]["messages"][1] == {"role": "assistant", "content": shown}


def test_the_page_fits_a_phone_labels_its_controls_and_stands_alone(browser, keyed_server):
    import httpx
    from selenium.webdriver.common.by import By

    browser.set_window_size(375, 740)
    open_page(browser, keyed_server, key=None)
    fill(browser)  # opens the settings, which start closed this narrow
    width = browser.execute_script("return [document.documentElement.scrollWidth, window.innerWidth]")
    assert width[0] <= width[1], f"the page is {width[0]} px wide in a {width[1]} px window"
    send = browser.find_element(By.ID, "send").rect
    assert send["x"] + send["width"] <= width[1]
    for control in browser.find_elements(By.CSS_SELECTOR, "input, textarea, button"):
        if control.is_displayed():
            assert control.accessible_name, f"#{control.get_attribute('id')} has no accessible name"
    # nothing from elsewhere (the machine may be offline), and model output is never parsed as HTML
    page = httpx.get(keyed_server + "/", timeout=10).text
    assert not re.search(r"<script[^>]* src|<link|https?://", page) and "innerHTML" not in page
