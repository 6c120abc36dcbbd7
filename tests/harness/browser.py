"""A real Chromium for browser tests: Debian's `chromium` and `chromium-driver`, driven by Selenium.

The packages are installed with apt-get when missing (as the servers' are, see
`servers/install.py`); Selenium is pointed at Debian's chromedriver and chromium
binaries, so its own driver manager never downloads anything.
"""

from __future__ import annotations

import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.harness.servers.base import HarnessError
from tests.harness.servers.install import _services_not_autostarted
from tests.harness.servers.process import is_root, run_command

DEBIAN_PACKAGES = ("chromium", "chromium-driver")
_lock = threading.Lock()


@dataclass(frozen=True)
class Chromium:
    browser: Path
    driver: Path


def _found() -> Chromium | None:
    browser = shutil.which("chromium") or shutil.which("chromium", path="/usr/bin")
    driver = shutil.which("chromedriver") or shutil.which("chromedriver", path="/usr/bin")
    return Chromium(Path(browser), Path(driver)) if browser and driver else None


def ensure_chromium() -> Chromium:
    """Debian's chromium and chromedriver, installed with apt-get when missing."""
    with _lock:
        found = _found()
        if found is not None:
            return found
        if shutil.which("apt-get") is None:
            raise HarnessError("chromium and chromedriver are not installed and there is no apt-get to install them")
        if is_root():
            sudo: list[str] = []
        elif shutil.which("sudo"):
            sudo = ["sudo", "-n"]
        else:
            raise HarnessError("chromium is not installed; installing it needs root or sudo")
        install = [*sudo, "env", "DEBIAN_FRONTEND=noninteractive", "apt-get", "install", "-y", "-q", *DEBIAN_PACKAGES]
        with _services_not_autostarted(sudo):
            result = run_command(install, what="apt-get install chromium", timeout=1800, check=False)
            if result.returncode != 0:
                run_command([*sudo, "apt-get", "update", "-q"], what="apt-get update", timeout=600)
                result = run_command(install, what="apt-get install chromium", timeout=1800, check=False)
        found = _found()
        if found is None:
            raise HarnessError(
                "apt-get install chromium chromium-driver did not provide them:\n" + (result.stdout + result.stderr)[-4000:]
            )
        return found


def chrome_driver(width: int = 1400, height: int = 1000) -> Any:
    """A headless Chromium under Selenium; the caller quits it."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium = ensure_chromium()
    options = webdriver.ChromeOptions()
    options.binary_location = str(chromium.browser)
    for argument in (
        "--headless=new",
        "--no-sandbox",  # as root there is no sandbox to enter
        "--disable-dev-shm-usage",
        "--disable-gpu",
        f"--window-size={width},{height}",
        "--lang=en-US",
    ):
        options.add_argument(argument)
    return webdriver.Chrome(service=Service(executable_path=str(chromium.driver)), options=options)
