"""Debian's Chromium, headless, driven by Playwright: what the console tests look through.

Playwright's own browser download cannot run here (no CDN), so it drives the system browser
(``/usr/bin/chromium``, from ``apt-get install chromium``). Every request the page makes to
anything but loopback is refused and recorded, so a test proves the page needs no internet; every
console error and uncaught exception is recorded, so a test proves the page has none.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import pytest

CHROMIUM_ENV = "OPTJOB_CHROMIUM"
_FLAGS = [
    "--no-sandbox",  # CI runs as root
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]


def chromium_path() -> str:
    path = os.environ.get(CHROMIUM_ENV) or shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        pytest.fail("Chromium is not installed: apt-get install chromium (scripts/test.sh installs it)")
    return path


@dataclass
class Watched:
    """What a page did that a test must see: console errors and requests that left loopback."""

    errors: list[str] = field(default_factory=list)
    outside: list[str] = field(default_factory=list)
    dialogs: list[str] = field(default_factory=list)


@contextmanager
def browser() -> Iterator[tuple[object, Watched]]:
    """A fresh headless Chromium; yields (Playwright Browser, what its pages did)."""
    from playwright.sync_api import sync_playwright

    watched = Watched()
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=chromium_path(), headless=True, args=_FLAGS)
        try:
            yield chromium, watched
        finally:
            chromium.close()


def new_page(chromium: object, watched: Watched):
    """A page in its own context (its own cookies) that records errors and refuses the internet."""
    context = chromium.new_context(viewport={"width": 1280, "height": 900})  # type: ignore[attr-defined]

    def route(route) -> None:
        host = urlsplit(route.request.url).hostname or ""
        if route.request.url.startswith("data:") or host.startswith("127.") or host == "localhost":
            route.continue_()
        else:
            watched.outside.append(route.request.url)
            route.abort()

    context.route("**/*", route)
    page = context.new_page()
    page.on("console", lambda message: watched.errors.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: watched.errors.append(f"uncaught: {error}"))

    def confirm(dialog) -> None:  # the console's confirmations: recorded, then accepted
        watched.dialogs.append(dialog.message)
        dialog.accept()

    page.on("dialog", confirm)
    return page
