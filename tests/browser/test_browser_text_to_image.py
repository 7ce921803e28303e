"""End to end: typing a prompt in the Text to image tab brings an image from the one-step student,
and "Compare with teacher" shows both with their times."""

import pytest

pytestmark = pytest.mark.browser


def _gallery_srcs(page) -> list[str]:
    return page.eval_on_selector_all("#t2i_gallery img", "els => els.map(e => e.src)")


def test_typing_a_prompt_gives_an_image_and_compare_shows_both(page):
    page.get_by_role("tab", name="Text to image").click()
    prompt = page.locator("#t2i_prompt textarea")
    prompt.wait_for(state="visible")
    before = _gallery_srcs(page)
    prompt.fill("")
    prompt.type("a girl with long pink hair, green eyes and glasses", delay=5)   # regenerates as typed
    page.wait_for_function(
        "prev => { const s = [...document.querySelectorAll('#t2i_gallery img')].map(e => e.src);"
        " return s.length > 0 && s.join() !== prev.join(); }", arg=before, timeout=120_000)
    assert _gallery_srcs(page)
    info = page.locator("#t2i_info")
    page.wait_for_function("() => /ms/.test(document.querySelector('#t2i_info').innerText)", timeout=60_000)
    assert "step" in info.inner_text()

    page.locator("#t2i_compare").click()
    page.locator("#t2i_compare_teacher img").wait_for(state="visible", timeout=240_000)
    page.locator("#t2i_compare_student img").wait_for(state="visible", timeout=60_000)
    page.wait_for_function("() => /faster|speedup|×/.test(document.querySelector('#t2i_compare_info').innerText)",
                           timeout=60_000)
    assert "Traceback" not in page.content()
