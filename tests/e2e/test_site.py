"""The browsable book (``make site``) in a real browser: every page loads, every figure renders, no
internal link is broken. Built here from two lessons executed in fast mode (``make site`` itself
uses ``make course``'s full-mode run)."""

from __future__ import annotations

import functools
import http.server
import importlib.util
import shutil
import threading
import urllib.request
from pathlib import Path
from urllib.parse import urljoin, urlparse

import nbformat
import pytest
from lab_server import find_chromium
from nbconvert.preprocessors import ExecutePreprocessor

sync_api = pytest.importorskip(
    "playwright.sync_api", reason="playwright is not installed (pip install -e '.[dev]')"
)

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = find_chromium()
LESSONS = ("00_setup.ipynb", "04_communication.ipynb")

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        CHROMIUM is None,
        reason="no chromium on PATH: browser test skipped (Debian: apt-get install chromium)",
    ),
]


def load_builder():
    spec = importlib.util.spec_from_file_location("book_build", ROOT / "book" / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # no line per request in the test's output
        pass


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    executed = tmp_path_factory.mktemp("executed")
    for name in LESSONS:  # as make course does, in fast mode (COURSE_FAST=1 under make test)
        notebook = nbformat.read(ROOT / "notebooks" / name, as_version=4)
        ExecutePreprocessor(timeout=600).preprocess(
            notebook, {"metadata": {"path": ROOT / "notebooks"}}
        )
        nbformat.write(notebook, executed / name)
    out = tmp_path_factory.mktemp("site")
    load_builder().build(executed, out, "https://github.com/example/parallel-dl-course")
    handler = functools.partial(Quiet, directory=str(out))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield out, f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    shutil.rmtree(out, ignore_errors=True)


def reachable(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status == 200
    except OSError:
        return False


def test_every_page_loads_every_figure_renders_and_no_internal_link_is_broken(site):
    out, base = site
    pages = sorted(p.name for p in out.glob("*.html"))
    assert {"index.html", "00_setup.html", "04_communication.html", "scripts.html"} <= set(pages)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page()
        errors = []
        page.on("pageerror", lambda err: errors.append(str(err)))
        internal = set()
        figures = 0
        for name in pages:
            response = page.goto(base + name, wait_until="load")
            assert response.ok, name
            images = page.eval_on_selector_all(
                "img", "els => els.map(e => [e.currentSrc, e.complete && e.naturalWidth > 0])"
            )
            broken = [src[:80] for src, ok in images if not ok]
            assert not broken, f"{name}: figures that did not render: {broken}"
            figures += len(images)
            for href in page.eval_on_selector_all("a[href]", "els => els.map(e => e.href)"):
                url = urlparse(href)
                if href.startswith(base):
                    internal.add(urljoin(href, url.path))  # the page, without its #anchor
            if name.endswith("_setup.html"):
                nav = page.inner_text("nav.course-bar")
                assert "01_cnn_single_device" in nav  # the next lesson
                assert "launch on Binder" in nav and "open in Colab" in nav
        assert figures >= 3, "the executed lessons' figures are in the pages"
        browser.close()
    missing = [u for u in sorted(internal) if not reachable(u)]
    assert not missing, f"broken internal links: {missing}"
    assert not errors, errors
