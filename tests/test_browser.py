"""A person's view of the reports: headless Chromium (Debian's, installed by `scripts/install-chromium`, driven by
Playwright) opens a language-model dictionary's report, a toy SPD run's report and the index across both. Every
figure must load, nothing may be fetched from the network, the console must stay free of errors, and the latent
list must filter and sort. Screenshots go to `test-artifacts/browser/` (or `$UNMERGE_TEST_ARTIFACTS/browser/`)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import TINY_TMS
from unmerge import api

sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed (it is in the test extra)")
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-sync",
    "--disable-background-networking",
    "--disable-component-update",
]
ARTIFACTS = Path(os.environ.get("UNMERGE_TEST_ARTIFACTS", Path(__file__).resolve().parents[1] / "test-artifacts"))


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    if not Path(CHROMIUM).is_file():
        pytest.skip(
            "Chromium is not installed: `scripts/install-chromium` installs Debian's package (it needs root "
            "and apt-get); `make test` runs it first"
        )
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        yield launched
        launched.close()


class Page:
    """A page opened from disk that records console errors, uncaught exceptions and every non-local request."""

    def __init__(self, browser: object, path: Path) -> None:
        self.problems: list[str] = []
        self.page = browser.new_page(viewport={"width": 1200, "height": 900})
        self.page.on(
            "console",
            lambda message: message.type == "error" and self.problems.append(f"console error: {message.text}"),
        )
        self.page.on("pageerror", lambda error: self.problems.append(f"page error: {error}"))
        self.page.route("**/*", self._local_only)
        self.page.goto(path.as_uri())
        self.page.wait_for_load_state("load")

    def _local_only(self, route: object) -> None:
        if route.request.url.startswith(("file:", "data:")):
            route.continue_()
        else:
            self.problems.append(f"network request: {route.request.url}")
            route.abort()

    def figures_loaded(self) -> list[bool]:
        return self.page.eval_on_selector_all("img", "images => images.map(i => i.complete && i.naturalWidth > 0)")

    def visible_rows(self, table: str) -> list[str]:
        return self.page.eval_on_selector_all(
            f"{table} tbody tr", "rows => rows.filter(r => r.offsetParent !== null).map(r => r.dataset.latent ?? '')"
        )

    def column(self, table: str, index: int) -> list[str]:
        script = f"rows => rows.map(r => r.cells[{index}].dataset.sort ?? r.cells[{index}].textContent)"
        return self.page.eval_on_selector_all(f"{table} tbody tr", script)

    def screenshot(self, name: str) -> None:
        (ARTIFACTS / "browser").mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(ARTIFACTS / "browser" / name), full_page=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """A dictionary on a tiny language model, a tiny TMS 5-2+ID decomposition, and the index over both."""
    from tests.test_language import tiny_dictionary_config

    root = tmp_path_factory.mktemp("reports")
    cache = tmp_path_factory.getbasetemp() / "unmerge-cache"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("UNMERGE_CACHE_DIR", str(cache))
        dictionary = api.train_dictionary(tiny_dictionary_config(root, cache), root / "dictionary").run_dir
        spd = api.decompose(api.load_run_config("tms-5-2-id", TINY_TMS), root / "spd").run_dir
    index = api.runs_index([dictionary, spd], root / "index", columns=["mmcs", "heldout/fvu", "heldout/l0"])
    return dictionary, spd, index


def _numbers(values: list[str]) -> list[float]:
    return [float(value) for value in values]


def test_language_dictionary_report_loads_filters_and_sorts(browser, runs) -> None:
    page = Page(browser, runs[0] / "report.html")
    loaded = page.figures_loaded()
    assert loaded and all(loaded), loaded
    everything = page.visible_rows("#latents")
    assert len(everything) > 3
    page.page.fill("#latent-filter", everything[2])
    assert page.visible_rows("#latents") == [everything[2]]  # a latent's number finds exactly that latent
    page.page.fill("#latent-filter", "no token reads like this")
    assert page.visible_rows("#latents") == []
    word = page.page.locator("#latents tbody tr").nth(1).locator(".tok.max").first.inner_text().strip()
    assert word, "the strongest token of a snippet is blank"
    page.page.fill("#latent-filter", word)
    matching = page.visible_rows("#latents")
    assert everything[1] in matching and set(matching) <= set(everything)  # text finds the latents showing it
    page.page.fill("#latent-filter", "")
    assert page.visible_rows("#latents") == everything
    density = page.page.locator("#latents th", has_text="density")
    density.click()
    assert _numbers(page.column("#latents", 1)) == sorted(_numbers(page.column("#latents", 1)))
    density.click()
    assert _numbers(page.column("#latents", 1)) == sorted(_numbers(page.column("#latents", 1)), reverse=True)
    page.page.locator("#latents th", has_text="latent").first.click()
    assert _numbers(page.column("#latents", 0)) == sorted(_numbers(page.column("#latents", 0)))
    page.screenshot("dictionary_report.png")
    assert page.problems == []


def test_spd_report_shows_every_figure(browser, runs) -> None:
    page = Page(browser, runs[1] / "report.html")
    loaded = page.figures_loaded()
    assert len(loaded) == 5 and all(loaded), loaded
    assert page.page.locator("h2", has_text="Metrics").count() == 1
    page.screenshot("spd_report.png")
    assert page.problems == []


def test_index_sorts_runs_and_links_their_reports(browser, runs) -> None:
    page = Page(browser, runs[2])
    titles = page.column("table.sortable", 0)
    assert len(titles) == 2
    page.page.locator("th", has_text="run").click()
    assert page.column("table.sortable", 0) == sorted(titles)
    page.page.locator("th", has_text="run").click()
    assert page.column("table.sortable", 0) == sorted(titles, reverse=True)
    page.screenshot("index.png")
    page.page.locator("a").first.click()
    page.page.wait_for_load_state("load")
    assert page.page.url.endswith("/report.html") and all(page.figures_loaded())
    assert page.problems == []
