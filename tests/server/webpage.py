"""What the browser tests of the web page at / share (test_web_chat.py, test_web_completion.py):
a real headless browser (Debian's chromium + chromedriver) driven by selenium. Importing this
skips the importing test module where chromium is not installed."""

from __future__ import annotations

import os
import shutil

import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
if not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)):
    pytest.skip(
        "chromium and chromedriver are not installed (apt-get install chromium chromium-driver; "
        ".ci/run does)",
        allow_module_level=True,
    )

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.options import Options  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

WAIT = 60  # seconds: generous, the machine is shared; nothing here asserts timings
MODE_KEY = "gpt-serve-chat:mode"  # where the page keeps the mode the user chose


@pytest.fixture(scope="module")
def browser():
    options = Options()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1000,800"):
        options.add_argument(arg)
    # An explicit driver path: selenium-manager would otherwise try to download one.
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    yield driver
    driver.quit()


def open_page(driver, url: str, mode: str | None = None, wait: bool = True):
    """Load the page from the server at `url` with its default settings (localStorage cleared),
    as if the user had chosen `mode` before when one is given; wait for the model list."""
    driver.get(url + "/")
    driver.execute_script("localStorage.clear()")
    if mode is not None:
        driver.execute_script("localStorage.setItem(arguments[0], arguments[1])", MODE_KEY, mode)
    driver.refresh()
    if wait:
        wait_for_models(driver)
    return driver


def wait_for_models(driver) -> None:
    WebDriverWait(driver, WAIT).until(lambda d: d.find_element(By.ID, "model").get_attribute("data-loaded"))


def mode_of(driver) -> str:
    return driver.execute_script("return document.body.dataset.mode")


def set_field(driver, element_id: str, value) -> None:
    # Settings live in a collapsible panel; set values through the DOM as typing would, so the
    # page's own change handlers (localStorage) run.
    driver.execute_script(
        "const el = document.getElementById(arguments[0]); el.value = arguments[1];"
        "el.dispatchEvent(new Event('change'));",
        element_id,
        str(value),
    )


def text_of(driver, element) -> str:
    return driver.execute_script("return arguments[0].textContent", element)
