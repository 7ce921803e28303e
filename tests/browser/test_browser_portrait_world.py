"""End to end: the Portrait world tab renders a new portrait when an attribute changes."""

import pytest

pytestmark = pytest.mark.browser


def _image_src(page) -> str:
    img = page.locator("#world_image img")
    img.wait_for(state="visible")
    return img.get_attribute("src")


def test_changing_an_attribute_brings_a_new_image(page):
    page.get_by_role("tab", name="Portrait world").click()
    first = _image_src(page)  # rendered on load
    caption_before = page.locator("#world_caption textarea").input_value()

    page.locator("#world_hair_color input").click()
    page.get_by_role("option", name="pink").click()

    page.wait_for_function(
        "prev => { const i = document.querySelector('#world_image img'); return i && i.src !== prev; }",
        arg=first, timeout=60_000)
    caption = page.locator("#world_caption textarea")
    page.wait_for_function(
        "() => /pink/.test(document.querySelector('#world_caption textarea').value)", timeout=30_000)
    assert "pink" in caption.input_value()
    assert caption.input_value() != caption_before or "pink" in caption_before


def test_non_numeric_seed_shows_a_message_not_a_traceback(page):
    page.get_by_role("tab", name="Portrait world").click()
    _image_src(page)
    seed = page.locator("#world_seed textarea, #world_seed input").first
    seed.fill("twelve")
    seed.press("Enter")
    toast = page.get_by_text("whole number", exact=False).first
    toast.wait_for(state="visible", timeout=30_000)
    assert "Traceback" not in page.content()
