"""Screenshots of `featuredb serve`'s feature page and search page (for the docs).

    python scripts/screenshot_pages.py --db featuredb-demo/catalogue
    python scripts/screenshot_pages.py --db DIR --feature smollm2-res-L15-w4096-k32/557 --query "closing parentheses"

Serves the catalogue on a free local port, opens the pages in headless Chromium (the system's,
through Playwright) and writes docs/feature-page.png and docs/search-page.png. Without --feature
it shows the search's first result.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote, urlencode

import sys

import click

from featuredb.server import create_app

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the test suite's uvicorn thread and Chromium finder
from serving import CHROMIUM_ARGS, chromium, serving  # noqa: E402


@click.command()
@click.option("--db", required=True, help="Catalogue directory or URI.")
@click.option("--query", default="numbers and digits", show_default=True, help="Search shown on the search page.")
@click.option("--feature", "feature_ref", default=None, metavar="CODER_ID/INDEX", help="Feature page to show.")
@click.option("--text", default=None, help="Also run this text in the feature page's test-text box.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=ROOT / "docs", show_default=True)
@click.option("--width", type=int, default=1400, show_default=True, help="Viewport width in CSS pixels.")
@click.option("--height", type=int, default=1600, show_default=True,
              help="Height of the shot in CSS pixels (0: the whole page).")
def main(db: str, query: str, feature_ref: str | None, text: str | None, out: Path, width: int, height: int) -> None:
    from playwright.sync_api import sync_playwright

    browser_path = chromium()
    if browser_path is None:
        raise click.ClickException("no Chromium found (apt-get install chromium)")
    app = create_app(db)
    cat = app.state.catalogue
    if feature_ref is None:
        top = cat.search(query).limit(1).to_list()
        if not top:
            raise click.ClickException(f"the search {query!r} found nothing: give --feature")
        feature_ref = f"{top[0]['coder_id']}/{top[0]['feature']}"
    coder_id, _, index = feature_ref.rpartition("/")
    feature_path = f"/features/{quote(coder_id, safe='')}/{index}" + (f"?{urlencode({'text': text})}" if text else "")
    out.mkdir(parents=True, exist_ok=True)
    with serving(app) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=browser_path, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": width, "height": height or 900}, device_scale_factor=1)
        page.set_default_timeout(300_000)  # a test text loads the subject model first
        for name, path in [("search-page.png", f"/?{urlencode({'q': query})}"), ("feature-page.png", feature_path)]:
            response = page.goto(url + path)
            if response is None or not response.ok:
                raise click.ClickException(f"{path}: HTTP {response.status if response else '?'}")
            page.screenshot(path=str(out / name), full_page=not height)
            click.echo(f"{out / name}  <- {path}")
        browser.close()


if __name__ == "__main__":
    main()
