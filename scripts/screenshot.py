"""Screenshot a tab of a running studio with headless Chromium (for the README).

    python app.py --port 7861 &  python scripts/screenshot.py --url http://127.0.0.1:7861 --tab "Portrait world" --out assets/examples/screenshot.png
"""

from __future__ import annotations

import argparse
import shutil

from playwright.sync_api import sync_playwright


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--url", default="http://127.0.0.1:7860")
    p.add_argument("--tab", default="Portrait world")
    p.add_argument("--out", default="assets/examples/screenshot.png")
    p.add_argument("--wait_for", default="#world_image img", help="CSS selector to wait for")
    args = p.parse_args()
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=shutil.which("chromium"), headless=True,
                                     args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        page = browser.new_page(viewport={"width": 1400, "height": 1100})
        page.goto(args.url)
        page.get_by_role("tab", name=args.tab).click()
        page.locator(args.wait_for).first.wait_for(state="visible", timeout=120_000)
        page.wait_for_timeout(1500)
        page.screenshot(path=args.out, full_page=True)
        browser.close()


if __name__ == "__main__":
    main()
