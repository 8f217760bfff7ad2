"""The documentation site, opened in a real headless browser (`nox -s docs`, after
`mkdocs build --strict`): the API page of `PixelDiT` shows its signature with shapes, and
the site's search finds `load_reference`.

Marked `docs`: the default test session leaves these out (they need the `docs` extra and a
browser). The browser is Debian's chromium (`apt-get install -y chromium`), or one that
playwright installed; without either the tests skip and say so.
"""

import functools
import http.server
import os
import pathlib
import shutil
import subprocess
import sys
import threading

import pytest


pytestmark = pytest.mark.docs

ROOT = pathlib.Path(__file__).resolve().parents[1]
SITE = pathlib.Path(os.environ.get("PIXELDIT_DOCS_SITE", ROOT / "site"))
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def _chromium() -> str | None:
    """Debian's chromium, else None (then playwright's own, if it installed one)."""
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name) or (f"/usr/bin/{name}" if os.path.exists(f"/usr/bin/{name}") else None)
        if found:
            return found
    return None


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def site_url():
    pytest.importorskip("mkdocs", reason="the `docs` extra installs mkdocs (nox -s docs)")
    if not (SITE / "index.html").is_file():  # not built yet: build it as `nox -s docs` does
        subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(SITE)], cwd=ROOT, check=True)
    handler = functools.partial(_QuietHandler, directory=str(SITE))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def page(site_url):
    sync_api = pytest.importorskip("playwright.sync_api", reason="the `docs` extra installs playwright")
    with sync_api.sync_playwright() as p:
        executable = _chromium()
        try:
            browser = p.chromium.launch(executable_path=executable, args=CHROMIUM_FLAGS)
        except Exception as e:  # no browser to launch on this machine
            if executable is None:
                pytest.skip(
                    "no browser could be installed: neither Debian's chromium (`apt-get install -y chromium`) "
                    f"nor playwright's (`playwright install chromium`) is present ({type(e).__name__})"
                )
            raise
        page = browser.new_page()
        page.set_default_timeout(30_000)
        yield page
        browser.close()


def test_api_page_of_pixeldit_renders_its_signature(page, site_url):
    page.goto(f"{site_url}/api/models.html")
    heading = page.locator("[id='pixeldit_eqx.PixelDiT']")
    assert heading.count() == 1 and heading.is_visible()
    assert "PixelDiT" in heading.inner_text()
    signatures = page.locator(".doc-signature").all_inner_texts()
    call = [s for s in signatures if s.startswith("__call__(x: Float[Array, 'C H W']")]
    assert call, signatures[:6]
    assert "y: Int[ArrayLike, '']" in call[0] and "-> Float[Array, '{self.in_channels} H W']" in call[0]


def test_search_finds_load_reference(page, site_url):
    page.goto(f"{site_url}/index.html")
    # The search index loads in a web worker; until then the box says "Initializing search".
    page.wait_for_function(
        "() => { const m = document.querySelector('.md-search-result__meta');"
        " return m !== null && m.textContent.trim() !== '' && !/initializing/i.test(m.textContent); }"
    )
    box = page.locator("input.md-search__input")
    box.click()
    box.press_sequentially("load_reference")
    results = page.locator(".md-search-result__item a")
    results.first.wait_for(state="visible")
    hrefs = [results.nth(i).get_attribute("href") for i in range(results.count())]
    # Results link to the page with the search term as `?h=...`, then the anchor.
    assert any("/api/loading.html" in h and h.endswith("#pixeldit_eqx.load_reference") for h in hrefs), hrefs
    assert "load_reference" in page.locator(".md-search-result").inner_text()


def test_strict_build_flags_a_public_name_without_a_docstring(tmp_path, caplog):
    """The griffe extension of the site: a missing docstring on a public name is a warning
    (which `mkdocs build --strict` turns into a failure), and shape aliases are expanded."""
    griffe = pytest.importorskip("griffe", reason="the `docs` extra installs mkdocstrings-python (griffe)")
    pkg = tmp_path / "fakepkg"  # laid out as pixeldit_eqx is
    pkg.mkdir()
    (pkg / "__init__.py").write_text('"""A package."""\nfrom ._x import Model as Model, helper as helper\n')
    (pkg / "_custom_types.py").write_text('from jaxtyping import Array, Float\nImage = Float[Array, "C H W"]\n')
    (pkg / "_x.py").write_text(
        "from ._custom_types import Image\n\n"
        "class Model:\n"
        '    """Documented."""\n\n'
        "    def __call__(self, x: Image) -> Image:\n"
        "        return x\n\n"
        "    def _private(self):\n"
        "        pass\n\n"
        "def helper():\n"
        '    """Documented too."""\n'
    )
    extension = griffe.load_extensions({str(ROOT / "docs" / "_griffe" / "checks.py"): {"package": "fakepkg"}})
    with caplog.at_level("WARNING"):
        loaded = griffe.load("fakepkg", search_paths=[str(tmp_path)], extensions=extension)
    flagged = [r.getMessage() for r in caplog.records if "without a docstring" in r.getMessage()]
    assert len(flagged) == 1, flagged  # not the documented class, function, or the private method
    assert flagged[0].startswith("fakepkg.Model.__call__: a public name without a docstring (")
    assert flagged[0].endswith("fakepkg/_x.py:6)")
    call = loaded["_x"].members["Model"].members["__call__"]
    assert str(call.parameters["x"].annotation) == "Float[Array, 'C H W']"
    assert str(call.returns) == "Float[Array, 'C H W']"


@pytest.mark.parametrize(
    ("path", "title"),
    [
        ("index.html", "Getting started"),
        ("cli.html", "Command line"),
        ("pytorch.html", "Coming from PyTorch"),
        ("troubleshooting.html", "Troubleshooting"),
        ("performance.html", "Performance"),
        ("api/index.html", "API overview"),
    ],
)
def test_pages_of_the_site(page, site_url, path, title):
    page.goto(f"{site_url}/{path}")
    assert page.locator("article h1").first.inner_text().strip().startswith(title)


def test_notebooks_render_with_their_outputs(page, site_url):
    page.goto(f"{site_url}/examples/digits.html")
    assert "Training PixelDiT on handwritten digits" in page.locator("article").inner_text()
    images = page.locator("article img[src^='data:image/png']")
    assert images.count() >= 1 and images.first.evaluate("img => img.naturalWidth") > 0
