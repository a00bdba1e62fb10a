"""The web page in a real headless Chromium (Debian's `chromium`, driven by Playwright) against a real stack: redis,
uvicorn and a Celery worker, with API keys on."""

import shutil
import sys
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ on the path: `_support`

from _support.fixtures import *  # noqa: F403
from _support.fixtures import _STACKS
from _support.servers import Stack

from jobs.keys import KeyStore

ADMIN_KEY = "md_browser-admin-key-0123456789"
# CI installs Debian's chromium; Playwright's own browser download is not used (no network on the test machines)
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# root in CI needs --no-sandbox; the rest keep Chromium from calling out (the test machines have no network)
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="session")
def site(tmp_path_factory):
    """A stack with keys on, two users' keys and an httpx client for each (to check what the page did)."""
    s = Stack(tmp_path_factory.mktemp("browser"), workers={"w1": "generate,finetune"}, MINIDALLE_AUTH="keys",
              MINIDALLE_ADMIN_KEY=ADMIN_KEY, MINIDALLE_MAX_STEPS="1000")
    _STACKS.append(s)
    keys = KeyStore(s.redis)
    s.tokens = {"alice": keys.create("alice")[0], "bob": keys.create("bob")[0]}
    s.as_user = {who: httpx.Client(base_url=s.base_url, timeout=60, headers={"Authorization": f"Bearer {t}"})
                 for who, t in s.tokens.items()}
    yield s
    for c in s.as_user.values():
        c.close()
    _STACKS.remove(s)
    s.stop()


@pytest.fixture(scope="module")  # not the session: while Playwright's sync API is open it keeps an event loop
def browser():                    # running in this thread, and later tests call asyncio.run()
    if CHROMIUM is None:
        pytest.fail("chromium is not installed: the page's tests drive Debian's chromium (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


class Browsing:
    """One browser tab on the page, with what went wrong in it (uncaught errors) and every URL it asked for."""

    def __init__(self, context, base_url: str):
        self.context, self.base_url = context, base_url
        self.page = context.new_page()
        self.errors: list[str] = []
        self.requests: list[str] = []
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.page.set_default_timeout(30_000)

    def open(self, fragment: str = "") -> None:
        self.page.goto(self.base_url + "/" + (f"#{fragment}" if fragment else ""))
        self.page.wait_for_selector("body[data-ready='1']")

    def use_key(self, token: str, name: str) -> None:
        self.page.get_by_label("API key").fill(token)
        self.page.get_by_role("button", name="Use key").click()
        self.page.wait_for_selector(f"#whoami:has-text('{name}')")


@pytest.fixture
def tab(browser, site):
    """A fresh browser context (empty localStorage) on the page, not yet opened."""
    context = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    b = Browsing(context, site.base_url)
    yield b
    context.close()
    assert not b.errors, f"uncaught errors in the page: {b.errors}"


@pytest.fixture
def alice(tab, site):
    """The page opened with alice's key entered in its key field."""
    tab.open()
    tab.use_key(site.tokens["alice"], "alice")
    return tab
