"""A real browser opens `make dashboard` and `make mlflow-ui` on a study that just ran.

test_browse.py checks the servers' JSON APIs; this test checks what a person sees: both UIs
are React single-page apps, so only a browser that runs their JavaScript shows whether the
study, its trials and the nested MLflow runs actually render. It drives Debian's headless
chromium through chromedriver (`make browser` installs both; `make test` runs it first) and
saves a screenshot of each page in $MNIST_OPT_TEST_ARTIFACTS/browser/ (default
reports/test-artifacts/browser/), plus `<page>-failure.png/.html` when a page does not render.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.common.exceptions import (ElementClickInterceptedException,
                                        NoSuchElementException,
                                        StaleElementReferenceException, WebDriverException)
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.chrome.webdriver import WebDriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from test_browse import _fetch, served_study  # tests/ is on sys.path (pytest)

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
ARTIFACTS = Path(os.environ.get("MNIST_OPT_TEST_ARTIFACTS",
                                ROOT / "reports" / "test-artifacts")) / "browser"
WAIT = 90.0  # seconds for a page to render: the SPAs are heavy and CI machines are slow
START = 300.0  # seconds for a server to answer: mlflow ui starts a dozen Python processes
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
pytestmark = [pytest.mark.e2e, pytest.mark.browser, pytest.mark.slow]


@contextmanager
def _chrome() -> Iterator[WebDriver]:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                "--window-size=1400,1000"):  # --no-sandbox: CI runs as root
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(WAIT)
    try:
        yield driver
    finally:
        driver.quit()


def _wait(driver: WebDriver, until: Callable[[WebDriver], object], what: str) -> None:
    """Wait for a condition while React renders (and re-renders, making elements stale)."""
    WebDriverWait(driver, WAIT, poll_frequency=0.5,
                  ignored_exceptions=(NoSuchElementException, StaleElementReferenceException,
                                      ElementClickInterceptedException)
                  ).until(until, f"{what} within {WAIT:.0f}s")


def _body(driver: WebDriver) -> str:
    return driver.find_element(By.TAG_NAME, "body").text


def _wait_text(driver: WebDriver, *texts: str) -> None:
    def shown(d: WebDriver) -> bool:
        return all(t in _body(d) for t in texts)
    _wait(driver, shown, f"page did not show {texts}")


@contextmanager
def _page(driver: WebDriver, url: str, name: str) -> Iterator[None]:
    """Open url; screenshot it as name.png once the block's checks pass, else name-failure.*"""
    try:
        driver.get(url)
        yield
    except Exception:
        with suppress(WebDriverException):  # keep the original error if the browser is gone
            driver.save_screenshot(str(ARTIFACTS / f"{name}-failure.png"))
            (ARTIFACTS / f"{name}-failure.html").write_text(driver.page_source)
        raise
    assert driver.save_screenshot(str(ARTIFACTS / f"{name}.png")), f"screenshot {name} failed"


def _check_dashboard(driver: WebDriver, base: str) -> None:
    studies = _fetch(f"{base}/api/studies", deadline=START)["study_summaries"]
    sid = next(s["study_id"] for s in studies if s["study_name"] == "mlp_tpe")
    trials = _fetch(f"{base}/api/studies/{sid}")["trials"]
    assert len(trials) == 2
    with _page(driver, f"{base}/dashboard/", "optuna-dashboard-studies"):
        _wait_text(driver, "mlp_tpe")
    with _page(driver, f"{base}/dashboard/studies/{sid}", "optuna-dashboard-study"):
        # the heading, and one line per trial in the intermediate-values chart's legend
        _wait_text(driver, f"mlp_tpe (id={sid})", "trial #0", "trial #1")
    with _page(driver, f"{base}/dashboard/studies/{sid}/trials", "optuna-dashboard-trials"):
        _wait_text(driver, "2 Trials", "Trial 0", "Trial 1", *{t["state"] for t in trials})


def _expand(driver: WebDriver, parent: str) -> None:
    """Click the +/- expander in the parent run's Run Name cell (children start collapsed)."""
    def click(d: WebDriver) -> bool:
        d.find_element(By.XPATH, f"//a[normalize-space()='{parent}']"
                                 "/ancestor::div[@role='gridcell'][1]//button").click()
        return True
    _wait(driver, click, f"no expander next to run {parent}")


def _check_mlflow(driver: WebDriver, base: str) -> None:
    api = f"{base}/api/2.0/mlflow"
    exps = _fetch(f"{api}/experiments/search", {"max_results": 10},
                  deadline=START)["experiments"]
    eid = next(e["experiment_id"] for e in exps if e["name"] == "mlp_tpe")
    runs = _fetch(f"{api}/runs/search", {"experiment_ids": [eid]})["runs"]
    tags = {r["info"]["run_name"]: {t["key"]: t["value"] for t in r["data"].get("tags", [])}
            for r in runs}
    parent = next(n for n, t in tags.items() if t["mnist_opt.kind"] == "study")
    parent_id = next(r["info"]["run_id"] for r in runs if r["info"]["run_name"] == parent)
    children = sorted(n for n, t in tags.items() if t.get("mlflow.parentRunId") == parent_id)
    assert parent.startswith("study-") and children == ["trial-0", "trial-1"]
    with _page(driver, f"{base}/#/experiments", "mlflow-experiments"):
        _wait_text(driver, "mlp_tpe")
    with _page(driver, f"{base}/#/experiments/{eid}/runs", "mlflow-runs"):
        _wait_text(driver, parent, "3 matching runs")
        if not all(c in _body(driver) for c in children):
            _expand(driver, parent)
        _wait_text(driver, parent, *children)


def test_uis_render_the_study_in_a_browser(stores: dict[str, str]) -> None:
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    if missing:
        pytest.fail(f"{' and '.join(missing)} not found: run `make browser` (Debian's chromium "
                    "and chromium-driver; `make test` does it)", pytrace=False)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for old in ARTIFACTS.glob("*-*.*"):  # a stale screenshot must not pass for this run's
        old.unlink()
    with served_study(stores) as (dash, ui), _chrome() as driver:
        _check_dashboard(driver, dash)
        _check_mlflow(driver, ui)
    for name in ("optuna-dashboard-studies", "optuna-dashboard-study", "optuna-dashboard-trials",
                 "mlflow-experiments", "mlflow-runs"):
        shot = ARTIFACTS / f"{name}.png"
        assert shot.is_file() and shot.read_bytes().startswith(PNG_MAGIC), shot
        assert shot.stat().st_size > 10_000, f"{shot} is suspiciously small"
