"""The pages jaxsae writes, opened as a person opens them: in a real headless Chromium
(Debian's chromium + chromedriver, driven by selenium). Every image loads, the console has no
errors, the tables are there. `.ci/run` installs the browser; elsewhere these tests skip,
saying why."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from jaxsae import cli
from jaxsae.train import train
from tests.conftest import small_config

webdriver = pytest.importorskip("selenium.webdriver")
markdown = pytest.importorskip("markdown")


def _browser_paths() -> tuple[str, str]:
    status = os.environ.get("JAXSAE_BROWSER_STATUS")  # set by .ci/run while it installs one
    if status:
        deadline = time.monotonic() + 600
        while not Path(status).exists() and time.monotonic() < deadline:
            time.sleep(2)
        if not Path(status).exists():
            pytest.skip("chromium was still being installed after 10 minutes")
        if Path(status).read_text().strip() != "0":
            log = Path(status).with_suffix(".log")
            last = log.read_text().strip().splitlines()[-1:] if log.is_file() else []
            pytest.skip(f"installing chromium failed (exit {Path(status).read_text().strip()}"
                        f"{': ' + last[0] if last else ''}; see {log})")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip("no headless browser: install Debian's chromium and chromium-driver "
                    "(.ci/run does) to open the pages jaxsae writes")
    return chromium, driver


@pytest.fixture(scope="module")
def browser():
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    chromium, driver = _browser_paths()
    options = Options()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    chrome = webdriver.Chrome(options=options, service=Service(driver))
    yield chrome
    chrome.quit()


def _open(browser, page: Path) -> dict:
    """Opens `page`; returns its images (src -> loaded), table count and console errors."""
    browser.get_log("browser")  # drop what earlier pages logged
    browser.get(page.as_uri())
    images = browser.execute_script(
        "return Array.from(document.images).map(i => [i.getAttribute('src'),"
        " i.complete && i.naturalWidth > 0])")
    rows = browser.execute_script("return document.querySelectorAll('table tr').length")
    errors = [e["message"] for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    return {"images": dict(images), "rows": rows, "errors": errors}


def test_analyze_page(browser, small_data, tmp_path, capsys):
    cfg = small_config(small_data, tmp_path / "run", log={"every_steps": 4, "curves": True})
    result = train(cfg, progress=False)
    out = tmp_path / "analysis"
    assert cli.main(["analyze", str(result.sae_dir), "--data", str(small_data), "--out",
                     str(out), "--tokens", "4096", "--cofire-tokens", "2048",
                     "--no-progress"]) == 0
    page = _open(browser, out / "index.html")
    assert page["errors"] == []
    assert page["images"] == {"density.png": True, "activation_histograms.png": True,
                              "geometry.png": True, "curves.png": True}
    assert page["rows"] > 10


def test_hub_model_card_as_the_hub_renders_it(browser, small_data, tmp_path, capsys):
    cfg = small_config(small_data, tmp_path / "run", sweep={"loss.1.coefficient": [0.01, 0.3]},
                       log={"every_steps": 4, "curves": True})
    train(cfg, progress=False)
    out = tmp_path / "hub"
    assert cli.main(["export", str(tmp_path / "run"), "--out", str(out), "--hub"]) == 0
    card = (out / "README.md").read_text()
    body = card.split("---", 2)[2]  # the Hub shows the front matter as metadata, not text
    html = markdown.markdown(body, extensions=["tables", "fenced_code"])
    (out / "card.html").write_text(f"<!doctype html><html><head><meta charset='utf-8'>"
                                   f"</head><body>{html}</body></html>")
    page = _open(browser, out / "card.html")
    assert page["errors"] == []
    assert page["images"] == {"curves.png": True}
    assert page["rows"] == 3  # the header and one row per SAE
