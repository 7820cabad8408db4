"""The chat page at / in a real browser: headless Chromium (Debian's `chromium` and
`chromium-driver`) driven by selenium types a message and waits for the streamed reply."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from test_serve import running_server

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
        for field, value in (("temperature", "0"), ("max-tokens", "24")):
            box = browser.find_element(By.ID, field)
            box.clear()
            box.send_keys(value)
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
