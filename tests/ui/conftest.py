"""Browser fixtures: Debian's headless chromium driven by Playwright, one page per test that fails
the test on any console error, CSP violation or request leaving the server's origin."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import REPO_ROOT

CHROMIUM = Path("/usr/bin/chromium")
# Without these, this machine's sandboxing and background services refuse or stall connections.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
LAPTOP = {"width": 1280, "height": 900}
PHONE = {"width": 390, "height": 844}


@pytest.fixture(scope="session")
def browser() -> Iterator[object]:
    if not CHROMIUM.exists():
        reason = f"Debian's chromium is not installed at {CHROMIUM}: `make browser` (or `make test`) installs it as root"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, timeout=60_000)
        try:
            yield chromium
        finally:
            chromium.close()


class Watched:
    """A page plus what went wrong on it: console errors and requests to other origins."""

    def __init__(self, page: object, origin: str) -> None:
        self.page = page
        self.problems: list[str] = []
        page.on("console", lambda m: m.type == "error" and self.problems.append(f"console: {m.text}"))
        page.on("pageerror", lambda e: self.problems.append(f"page error: {e}"))
        page.on("request", lambda r: r.url.startswith((origin, "data:"))
                or self.problems.append(f"request to another origin: {r.url}"))


@pytest.fixture
def open_page(browser, request: pytest.FixtureRequest) -> Iterator[object]:
    """open_page(url, viewport=LAPTOP, expect_errors=False) -> a fresh context's page (its own sessionStorage)."""
    opened: list[tuple[object, Watched, bool]] = []

    def open_(url: str, viewport: dict = LAPTOP, expect_errors: bool = False):
        context = browser.new_context(viewport=viewport)
        context.set_default_timeout(20_000)
        page = context.new_page()
        watched = Watched(page, url)
        opened.append((context, watched, expect_errors))
        return page

    yield open_
    for context, watched, expect_errors in opened:
        context.close()
        # A refused request (401, 422) logs "Failed to load resource" by design; a test that expects
        # refusals says so. CSP violations and foreign requests are never expected.
        problems = [p for p in watched.problems if not (expect_errors and "Failed to load resource" in p)]
        assert not problems, problems


@pytest.fixture(scope="session")
def screenshots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """docs/screenshots with UPDATE_SCREENSHOTS=1 (then committed), else a temporary dir."""
    if os.environ.get("UPDATE_SCREENSHOTS") == "1":
        path = REPO_ROOT / "docs" / "screenshots"
        path.mkdir(parents=True, exist_ok=True)
        return path
    return tmp_path_factory.mktemp("screenshots")
