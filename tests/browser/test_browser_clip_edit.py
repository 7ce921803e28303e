"""End to end: in the CLIP edit tab, type an edit, apply it, see the portrait change and its score;
an empty text gives a message. Skipped while the app shows no CLIP edit tab (no CLIP in assets/)."""

import pytest

pytestmark = pytest.mark.browser


def _open_tab(page):
    page.get_by_role("tab").first.wait_for(state="visible")  # the tab bar has rendered: count() does not wait
    tab = page.get_by_role("tab", name="CLIP edit")
    if tab.count() == 0:
        pytest.skip("the app shows no CLIP edit tab (it needs a CLIP, e.g. assets/clip, and a generator)")
    tab.first.click()


def _src(page, selector: str) -> str:
    img = page.locator(f"{selector} img")
    img.wait_for(state="visible", timeout=120_000)
    return img.get_attribute("src")


def test_typing_an_edit_changes_the_portrait(page):
    _open_tab(page)
    before = _src(page, "#clip_after")  # a random sample is shown on load
    page.locator("#clip_text textarea").fill("blue hair")
    page.locator("#clip_apply").click()
    page.wait_for_function(
        "([prev]) => { const i = document.querySelector('#clip_after img'); return i && i.src && i.src !== prev; }",
        arg=[before], timeout=300_000)
    page.wait_for_function("() => /CLIP score/.test(document.querySelector('#clip_info').innerText)",
                           timeout=60_000)
    assert "1. " in page.locator("#clip_history").inner_text()
    assert "Traceback" not in page.content()


def test_an_empty_text_says_what_to_type(page):
    _open_tab(page)
    _src(page, "#clip_after")
    page.locator("#clip_text textarea").fill("")
    page.locator("#clip_apply").click()
    page.get_by_text("type what the portrait should become", exact=False).first.wait_for(state="visible",
                                                                                        timeout=30_000)
