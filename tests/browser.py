"""Headless Chromium (Debian's ``chromium`` package) driven by Playwright, for tests that look at pages
the way a user does: every image loaded, nothing logged as an error."""

from __future__ import annotations

import contextlib
import os
import shutil

import pytest

# Flags for a closed network: without the background-networking ones Chromium keeps trying Google's hosts.
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]

# Chromium asks every site for /favicon.ico by itself; the Prefect UI answers 404 (its icons live under /ico/).
BROWSER_OWN = "/favicon.ico"


def chromium_path() -> str:
    path = os.environ.get("GPTPIPE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        pytest.fail("no Chromium: install Debian's package (apt-get install chromium) or set GPTPIPE_CHROMIUM", pytrace=False)
    return path


@contextlib.contextmanager
def page():
    """A fresh browser page; ``page.errors`` collects console errors and uncaught exceptions."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path(), args=FLAGS)
        try:
            pg = browser.new_page(viewport={"width": 1280, "height": 900})
            pg.errors = []
            pg.on("console", lambda m: pg.errors.append(f"{m.text} ({m.location.get('url')})")
                  if m.type == "error" and not m.location.get("url", "").endswith(BROWSER_OWN) else None)
            pg.on("pageerror", lambda e: pg.errors.append(str(e)))
            yield pg
        finally:
            browser.close()


def loaded_images(pg, at_least: int, timeout_ms: float = 60_000) -> list[dict]:
    """Wait until the page shows ``at_least`` images and every image finished loading; return each
    image's alt text, source kind and natural width (0 = broken)."""
    pg.wait_for_function(f"() => document.images.length >= {at_least} && [...document.images].every(i => i.complete)",
                         timeout=timeout_ms)
    return pg.eval_on_selector_all("img", "els => els.map(i => ({alt: i.alt, src: i.src.slice(0, 22), width: i.naturalWidth}))")
