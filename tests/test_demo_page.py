"""The demo page end to end: uvicorn serving the tiny run, driven in headless Chromium.

Uses Debian's ``chromium`` and ``chromium-driver`` (the driver is passed explicitly, so Selenium
downloads nothing); skipped, with the reason printed, where they are not installed. With
``LLAMAREC_SCREENSHOT=PATH`` the page with its results is saved there as a PNG.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
API_KEY = "demo-key"


@pytest.fixture
def browser(tmp_path: Path, capsys: pytest.CaptureFixture):
    def skip(reason: str) -> None:
        with capsys.disabled():  # shown even under -q, without -rs
            print(f"\ntest_demo_page skipped: {reason}")
        pytest.skip(reason)

    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.is_file()]
    if missing:
        skip(f"{' and '.join(missing)} not installed (apt-get install chromium chromium-driver)")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        skip("selenium is not installed (pip install -e '.[dev]')")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                "--window-size=1400,800", f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def server_url(tiny_pipeline_run: Path) -> Iterator[str]:
    """uvicorn serving the tiny run (with an API key) on a free loopback port, in a thread."""
    uvicorn = pytest.importorskip("uvicorn", reason="the serve extra (uvicorn) is not installed")
    from llamarec.pipeline import Recommender
    from llamarec.serve import create_app

    app = create_app(Recommender.load(tiny_pipeline_run), api_key=API_KEY)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    end = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < end, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def test_search_build_a_history_and_get_recommendations(browser, server_url: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 20)
    browser.get(server_url + "/")
    status = browser.find_element(By.ID, "status")
    wait.until(lambda d: "not ready" in status.text)  # the key is needed first
    assert "401" in status.text
    browser.find_element(By.ID, "api-key").send_keys(API_KEY, Keys.TAB)
    wait.until(lambda d: "48 items" in status.text)
    assert "LLM ranker" in status.text

    search = browser.find_element(By.ID, "search")
    results = browser.find_element(By.ID, "search-results")
    for query, title in (("item 1", "Item 1"), ("Item 2", "Item 2"), ("item 3", "Item 3")):
        search.clear()
        search.send_keys(query)
        wait.until(lambda d, q=query: results.get_attribute("data-query") == q)  # that search's answer is shown
        assert browser.find_element(By.CSS_SELECTOR, "#search-results li:first-child .title").text == title
        browser.find_element(By.CSS_SELECTOR, "#search-results li:first-child button.add").click()
    history = [li.text for li in browser.find_elements(By.CSS_SELECTOR, "#history .title")]
    assert history == ["Item 1", "Item 2", "Item 3"]

    button = browser.find_element(By.ID, "recommend")
    wait.until(lambda d: button.is_enabled())
    button.click()
    answers = browser.find_element(By.ID, "results")
    wait.until(lambda d: answers.get_attribute("data-answers") == "1")
    rows = browser.find_elements(By.CSS_SELECTOR, "#results-table tbody tr")
    assert len(rows) == 10  # the default k
    cells = [c.text for c in rows[0].find_elements(By.TAG_NAME, "td")]
    assert cells[0] == "1" and cells[2].startswith("Item ") and cells[2] not in history
    assert all(float(x) == float(x) for x in cells[3:6])  # score, retriever, ranker: numbers
    timings = browser.find_element(By.ID, "timings").text
    assert "retrieve" in timings and "rank" in timings and "batch of 1" in timings
    assert browser.find_element(By.ID, "error").text == ""

    # an item picked from the recommendations joins the history
    rows[0].find_element(By.CSS_SELECTOR, "button.add").click()
    assert browser.find_elements(By.CSS_SELECTOR, "#history .title")[-1].text == cells[2]
    if os.environ.get("LLAMAREC_SCREENSHOT"):
        button.click()
        wait.until(lambda d: answers.get_attribute("data-answers") == "2")
        browser.save_screenshot(os.environ["LLAMAREC_SCREENSHOT"])
