"""End to end: upload a portrait to the StyleGAN edit tab, invert it, move a slider, add a guided edit,
see each edit."""

import numpy as np
import pytest

from pipelines.data.portrait_world import PortraitWorld

pytestmark = pytest.mark.browser


def _src(page, selector: str) -> str:
    img = page.locator(f"{selector} img")
    img.wait_for(state="visible", timeout=120_000)
    return img.get_attribute("src")


def _wait_new_src(page, selector: str, previous: str | None, timeout: int = 120_000) -> str:
    page.wait_for_function(
        "([sel, prev]) => { const i = document.querySelector(sel + ' img'); return i && i.src && i.src !== prev; }",
        arg=[selector, previous], timeout=timeout)
    return page.locator(f"{selector} img").get_attribute("src")


def test_upload_invert_and_edit_with_a_slider(page, tmp_path):
    path = tmp_path / "portrait.png"
    world = PortraitWorld()
    world.render(world.sample_attributes(np.random.default_rng(3), split="heldout"),
                 seed=3, size=256).image.save(path)

    page.get_by_role("tab", name="StyleGAN edit").click()
    after_load = _src(page, "#sg_after")  # a random sample is shown on load
    page.get_by_role("tab", name="Upload").click()
    page.locator("#sg_upload input[type=file]").set_input_files(str(path))
    page.locator("#sg_invert").click()
    page.wait_for_function("() => /reconstruction error/.test(document.querySelector('#sg_info').innerText)",
                           timeout=180_000)
    edited = _wait_new_src(page, "#sg_after", after_load)

    number = page.locator("#sg_edit_glasses input[type=number]")
    number.fill("3")
    number.press("Enter")
    slid = _wait_new_src(page, "#sg_after", edited)

    # a guided edit (the latent classifier) on top of the slider
    page.locator("#sg_guided input").click()
    page.get_by_role("option", name="hair color: pink").click()
    _wait_new_src(page, "#sg_after", slid)
    assert "Traceback" not in page.content()


def test_invert_without_an_upload_says_what_to_do(page):
    page.get_by_role("tab", name="StyleGAN edit").click()
    _src(page, "#sg_after")
    page.get_by_role("tab", name="Upload").click()
    page.locator("#sg_invert").click()
    page.get_by_text("upload an image first", exact=False).first.wait_for(state="visible", timeout=30_000)
