"""The built book in a real browser, with the network cut off (issue: the book renders offline).

Opt-in: runs only with ``REFIMPL_BROWSER_TEST=1`` (``make browser-test`` sets it, after ``make
book``); otherwise every test here is skipped. When opted in, a missing build, browser or
Playwright is a failure, not a skip.

The built HTML (``book/_build/html``, or ``REFIMPL_BOOK_HTML``) is served on 127.0.0.1 and every
page is opened in headless Chromium (Debian's ``/usr/bin/chromium``, or ``REFIMPL_CHROMIUM``) driven
by Playwright. Every request to any other host is aborted and recorded. Each page must show:

* no console error and no uncaught exception;
* no failed request (blocked, refused or HTTP >= 400);
* every math element typeset by MathJax (an ``mjx-container`` inside each Sphinx ``.math``
  element, no MathJax error node, no raw ``$$``, ``\\(`` or ``\\[`` left in the visible text);
* every image loaded (``naturalWidth > 0``);
* every link into the book resolving: the target file exists in the build, and its ``#anchor``
  exists in that file.

A screenshot of the first screen of every page goes to ``book/_build/screenshots/`` (a build
artifact, not committed). Two more tests search the book with its offline search index and open
a chapter straight from disk (``file://``), as a reader without a server would.
"""

from __future__ import annotations

import functools
import html.parser
import os
import re
import shutil
import threading
import urllib.parse
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HTML = Path(os.environ.get("REFIMPL_BOOK_HTML", ROOT / "book" / "_build" / "html"))
SHOTS = Path(os.environ.get("REFIMPL_BOOK_SCREENSHOTS", ROOT / "book" / "_build" / "screenshots"))
CHROMIUM = os.environ.get("REFIMPL_CHROMIUM", "/usr/bin/chromium")
# The flags that let Debian's Chromium run headless as root on a machine without network access
# (without the background-networking ones it keeps trying to reach Google's hosts).
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage"]
ENABLED = os.environ.get("REFIMPL_BROWSER_TEST") == "1"

pytestmark = pytest.mark.skipif(not ENABLED,
                                reason="browser test is opt-in: REFIMPL_BROWSER_TEST=1 (make browser-test)")

# Pages Sphinx generates that are not part of the text (the index is checked, the search page
# has its own test below).
NOT_SCREENSHOTTED = {"genindex.html", "search.html", "py-modindex.html"}


def book_pages() -> list[str]:
    """Every HTML page of the build, relative to its root ('intro.html', 'notebooks/03_mla.html', ...)."""
    if not HTML.is_dir():
        return []
    return sorted(p.relative_to(HTML).as_posix() for p in HTML.rglob("*.html")
                  if not p.relative_to(HTML).as_posix().startswith(("_static/", "_sources/", "_images/")))


# ---------------------------------------------------------------------------- fixtures


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - signature of the base class
        pass


@pytest.fixture(scope="module")
def server():
    """The built book on http://127.0.0.1:<free port>/, for the duration of the module."""
    if not (HTML / "intro.html").is_file():
        pytest.fail(f"no built book at {HTML}: run `make book` first")
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(HTML)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    sync_api = _import_playwright()
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} not found: apt-get install chromium (or set REFIMPL_CHROMIUM)")
    profile = tmp_path_factory.mktemp("chromium-profile")
    with sync_api.sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(profile), executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True,
            viewport={"width": 1280, "height": 900})
        yield context
        context.close()


def _import_playwright():
    try:
        from playwright import sync_api
    except ImportError:  # opted in: a missing dependency is an error
        pytest.fail("playwright is not installed: pip install -e '.[browser]' (make browser-test does)")
    return sync_api


@pytest.fixture(scope="module")
def screenshots():
    if SHOTS.exists():
        shutil.rmtree(SHOTS)
    SHOTS.mkdir(parents=True)
    return SHOTS


class Visit:
    """One page load with everything the browser reported while loading it."""

    def __init__(self, context, url: str, local_prefixes: tuple[str, ...]):
        self.blocked: list[str] = []
        self.failed: list[str] = []
        self.console: list[str] = []
        self.page = context.new_page()

        def route(r):
            if r.request.url.startswith(local_prefixes):
                r.continue_()
            else:
                self.blocked.append(r.request.url)
                r.abort("blockedbyclient")

        self.page.route("**/*", route)
        self.page.on("console", lambda m: self.console.append(f"{m.type}: {m.text}") if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.console.append(f"uncaught: {e}"))
        self.page.on("requestfailed", lambda r: self.failed.append(f"{r.url} ({r.failure})"))
        self.page.on("response",
                     lambda r: self.failed.append(f"{r.url} (HTTP {r.status})") if r.status >= 400 else None)
        self.page.goto(url, wait_until="load")
        # MathJax typesets after 'load' (its script is deferred); wait for its startup promise.
        self.page.evaluate("""async () => {
            if (window.MathJax && MathJax.startup && MathJax.startup.promise) { await MathJax.startup.promise; }
        }""")
        self.page.wait_for_load_state("networkidle")

    def close(self):
        self.page.close()


@pytest.fixture
def visit(browser, server):
    opened = []

    def _visit(path: str) -> Visit:
        v = Visit(browser, f"{server}/{path}", (server + "/",))
        opened.append(v)
        return v

    yield _visit
    for v in opened:
        v.close()


# ---------------------------------------------------------------------------- page checks

# In the browser: every Sphinx math element must hold a MathJax container, no MathJax error, and
# no TeX may be left in the text a reader sees (code, cell outputs' code and tracebacks excluded):
# no $$, \( or \[, no $ touching a typeset formula, no $...$ holding a TeX command, ^, _ or braces.
MATH_CHECK = r"""() => {
    const math = Array.from(document.querySelectorAll('.math'));
    const untypeset = math.filter(e => !e.querySelector('mjx-container')).map(e => e.textContent.slice(0, 80));
    const errors = Array.from(document.querySelectorAll('mjx-merror, [data-mjx-error]'))
        .map(e => (e.getAttribute('data-mjx-error') || e.textContent).slice(0, 80));
    const main = document.querySelector('main') || document.body;
    const raw = [];
    const blocks = main.querySelectorAll('p, li, dd, dt, td, th, figcaption, h1, h2, h3, h4, h5, h6');
    for (const block of blocks) {
        if (block.closest('pre, code, .highlight')) continue;
        const copy = block.cloneNode(true);
        copy.querySelectorAll('p, li, dd, dt, td, th, figcaption').forEach(e => e.remove());   // own text only
        copy.querySelectorAll('mjx-container').forEach(e => e.replaceWith('\u27e8math\u27e9'));
        copy.querySelectorAll('pre, code, .highlight').forEach(e => e.remove());
        const t = copy.textContent;
        if (t.includes('$$') || t.includes('\\(') || t.includes('\\[')
            || /\$\u27e8math\u27e9|\u27e8math\u27e9\$/.test(t) || /\$[^$\s][^$]*[\\^_{}][^$]*\$/.test(t)) {
            raw.push(t.trim().replace(/\s+/g, ' ').slice(0, 100));
        }
    }
    return {count: math.length, containers: document.querySelectorAll('mjx-container').length,
            untypeset, errors, raw};
}"""

IMAGE_CHECK = """async () => {
    const imgs = Array.from(document.images);
    for (const img of imgs) { img.loading = 'eager'; }
    await Promise.all(imgs.map(img => img.complete ? null : new Promise(r => { img.onload = img.onerror = r; })));
    return imgs.map(img => ({src: img.getAttribute('src'), ok: img.complete && img.naturalWidth > 0}));
}"""


class _Ids(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.ids: set[str] = set()

    def handle_starttag(self, tag, attrs):
        for name, value in attrs:
            if name == "id" or (tag == "a" and name == "name"):
                self.ids.add(value)


@functools.cache
def anchors_of(path: Path) -> frozenset[str]:
    parser = _Ids()
    parser.feed(path.read_text(encoding="utf-8", errors="replace"))
    return frozenset(parser.ids)


def broken_internal_links(page_path: str, hrefs: list[str], server: str) -> list[str]:
    """The links of ``page_path`` into the book whose file or #anchor does not exist in the build."""
    bad = []
    base = f"{server}/{page_path}"
    for href in hrefs:
        if not href or href.startswith(("mailto:", "javascript:", "data:")):
            continue
        url = urllib.parse.urljoin(base, href)
        if not url.startswith(server + "/"):
            continue                                    # a link to another site: not loaded, not checked
        parsed = urllib.parse.urlsplit(url)
        rel = urllib.parse.unquote(parsed.path).lstrip("/")
        target = HTML / rel
        if target.is_dir():
            target = target / "index.html"
        if not target.is_file():
            bad.append(f"{href} -> missing file {rel}")
            continue
        fragment = urllib.parse.unquote(parsed.fragment)
        if fragment and target.suffix == ".html" and fragment not in anchors_of(target):
            bad.append(f"{href} -> no anchor #{fragment} in {rel}")
    return bad


def page_problems(v: Visit, path: str, server: str) -> dict[str, list]:
    math = v.page.evaluate(MATH_CHECK)
    images = v.page.evaluate(IMAGE_CHECK)
    hrefs = v.page.eval_on_selector_all("a[href]", "els => els.map(e => e.getAttribute('href'))")
    problems = {
        "blocked requests to other hosts": v.blocked,
        "failed requests": v.failed,
        "console errors": v.console,
        "math not typeset": math["untypeset"],
        "MathJax errors": math["errors"],
        "raw TeX in text": math["raw"],
        "images not loaded": [i["src"] for i in images if not i["ok"]],
        "broken internal links": broken_internal_links(path, hrefs, server),
    }
    if math["count"] and not math["containers"]:
        problems["math not typeset"].append(f"{math['count']} math elements, no mjx-container")
    return {k: sorted(set(val)) for k, val in problems.items() if val}


# ---------------------------------------------------------------------------- tests


def test_the_build_has_every_toc_page():
    """Each file named in _toc.yml became a page (a guard against testing a stale or partial build)."""
    yaml = pytest.importorskip("yaml")
    toc = yaml.safe_load((ROOT / "book" / "_toc.yml").read_text())
    files = [toc["root"]] + [c["file"] for part in toc.get("parts", []) for c in part.get("chapters", [])]
    missing = [f for f in files if not (HTML / f"{f}.html").is_file()]
    assert not missing, f"pages missing from {HTML}: {missing}"
    assert (HTML / "_static" / "mathjax" / "tex-svg.js").is_file(), "MathJax is not bundled in the build"


@pytest.mark.parametrize("path", book_pages() or ["(no build)"])
def test_page_renders_offline(path, visit, server, screenshots):
    if path == "(no build)":
        pytest.fail(f"no built book at {HTML}: run `make book` first")
    redirect = re.search(r'http-equiv="refresh"[^>]*url=([^"]+)"', (HTML / path).read_text(), re.IGNORECASE)
    if redirect:                                        # index.html: Jupyter Book's redirect to the root page
        assert (HTML / redirect.group(1)).is_file(), f"{path} redirects to a missing page {redirect.group(1)}"
        return
    v = visit(path)
    if path not in NOT_SCREENSHOTTED:
        v.page.screenshot(path=str(screenshots / (path.replace("/", "__").removesuffix(".html") + ".png")))
    problems = page_problems(v, path, server)
    assert not problems, f"{path}:\n" + "\n".join(f"  {k}: {val}" for k, val in problems.items())


def test_math_is_typeset_where_the_book_has_equations(visit):
    """A positive control: the MLA chapter's numbered equations are typeset, as SVG (no web font)."""
    v = visit("notebooks/03_mla.html")
    found = v.page.evaluate("""() => ({
        containers: document.querySelectorAll('mjx-container').length,
        svg: document.querySelectorAll('mjx-container svg').length,
        cache_eq: !!document.getElementById('equation-eq-mla-cache'),
    })""")
    assert found["cache_eq"], "the labelled equation eq-mla-cache is missing"
    assert found["containers"] > 20 and found["svg"] == found["containers"], found


# Every diagram of refimpl.diagrams is a figure with id "diagram-<name>" (glued into its chapter).
DIAGRAM_CHECK = """async () => {
    const figs = Array.from(document.querySelectorAll('figure[id^="diagram-"], div.figure[id^="diagram-"]'));
    const out = [];
    for (const f of figs) {
        const img = f.querySelector('img');
        if (img) { img.loading = 'eager'; }
        if (img && !img.complete) { await new Promise(r => { img.onload = img.onerror = r; }); }
        out.push({id: f.id, alt: img ? (img.getAttribute('alt') || '') : null,
                  ok: !!img && img.complete && img.naturalWidth > 0});
    }
    return out;
}"""


def test_every_diagram_loads_and_has_alt_text(visit):
    """Each diagram of refimpl.diagrams appears in the book, its image loads, and it has a real alt text."""
    from refimpl.diagrams import DIAGRAMS

    expected = {"diagram-" + name.replace("_", "-") for name in DIAGRAMS}
    found = {}
    for path in book_pages():
        if 'id="diagram-' not in (HTML / path).read_text(encoding="utf-8", errors="replace"):
            continue
        for fig in visit(path).page.evaluate(DIAGRAM_CHECK):
            found[fig["id"]] = dict(fig, page=path)
    assert expected <= set(found), f"diagrams missing from the book: {sorted(expected - set(found))}"
    bad = [f for f in found.values() if not f["ok"] or len((f["alt"] or "").split()) < 8]
    assert not bad, f"diagrams that do not load or lack an alt text of a sentence or more: {bad}"


def test_search_works_offline(visit):
    """The search page finds a chapter with the index that ships in the build."""
    v = visit("search.html?q=latent")
    v.page.wait_for_selector("#search-results ul.search li", timeout=15_000)
    hits = v.page.eval_on_selector_all("#search-results ul.search li a", "els => els.map(e => e.getAttribute('href'))")
    assert any("03_mla" in h for h in hits), hits
    assert not v.blocked and not v.console, (v.blocked, v.console)


def test_a_chapter_opens_from_disk(browser):
    """A reader with no server and no network opens a page from the folder: equations and figures render."""
    page = browser.new_page()
    blocked = []

    def route(r):
        if r.request.url.startswith("file://"):
            r.continue_()
        else:
            blocked.append(r.request.url)
            r.abort("blockedbyclient")

    page.route("**/*", route)
    try:
        page.goto((HTML / "notebooks" / "03_mla.html").as_uri(), wait_until="load")
        page.evaluate("async () => { if (window.MathJax && MathJax.startup) await MathJax.startup.promise; }")
        math = page.evaluate(MATH_CHECK)
        images = page.evaluate(IMAGE_CHECK)
    finally:
        page.close()
    assert not blocked, blocked
    assert math["count"] > 0 and not math["untypeset"] and not math["errors"], math
    assert images and all(i["ok"] for i in images), images


def test_link_checker_detects_broken_links(server):
    """The link check can fail: a missing file and a missing anchor are both reported."""
    bad = broken_internal_links("intro.html", ["notation.html", "no-such-page.html", "notation.html#no-such-anchor",
                                               "https://example.org/x.html"], server)
    assert bad == ["no-such-page.html -> missing file no-such-page.html",
                   "notation.html#no-such-anchor -> no anchor #no-such-anchor in notation.html"]


def test_pages_are_found():
    pages = book_pages()
    assert "intro.html" in pages and any(p.startswith("notebooks/") for p in pages), pages[:10]
    assert not any(re.search(r"_static|_sources", p) for p in pages)
