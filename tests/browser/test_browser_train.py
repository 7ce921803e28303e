"""End to end: launch a tiny DMD2 run of the embedded teacher from the Distill / train tab, watch it
progress to "finished", use it, and find it in the Text to image tab's model choice."""

import json

import pytest

pytestmark = pytest.mark.browser

RUN = "browser-dmd2"
TINY = {"steps": 4, "batch": 2, "real_images": 64, "captions_per_image": 1, "fake_updates": 1,
        "log_every": 1, "sample_every": 2, "checkpoint_every": 2, "num_samples": 2,
        "eval_prompts": 2, "eval_teacher_steps": 2}


def _table_text(page) -> str:
    return page.locator("#train_runs").inner_text()


def test_launch_watch_and_use_a_tiny_distillation_run(page):
    page.get_by_role("tab", name="Distill / train").click()
    page.locator("#train_method input").click()
    page.get_by_role("option", name="DMD2 one-step distillation (text to image)").click()
    base = page.locator("#train_base textarea, #train_base input").first
    page.wait_for_function("() => /portrait_teacher/.test((document.querySelector('#train_base textarea')"
                           " || document.querySelector('#train_base input')).value)", timeout=30_000)
    assert base.input_value().endswith("portrait_teacher")                      # the embedded teacher

    editor = page.locator("#train_settings .cm-content")
    editor.click()
    page.keyboard.press("Control+A")
    page.keyboard.press("Delete")
    page.keyboard.insert_text(json.dumps(TINY))
    page.locator("#train_name textarea, #train_name input").first.fill(RUN)
    page.locator("#train_launch").click()
    page.wait_for_function(f"() => /{RUN}/.test(document.querySelector('#train_message').innerText)",
                           timeout=60_000)
    assert "Traceback" not in page.content()

    # progress moves: the run list shows the run, then its steps, then "finished"
    page.wait_for_function(f"() => /{RUN}/.test(document.querySelector('#train_runs').innerText)", timeout=60_000)
    page.wait_for_function("() => /finished/.test(document.querySelector('#train_runs').innerText)",
                           timeout=600_000)
    assert "4/4" in _table_text(page)

    page.locator("#train_use").click()
    page.wait_for_function("() => /text_to_image choices/.test(document.querySelector('#train_message').innerText)",
                           timeout=60_000)

    page.get_by_role("tab", name="Text to image").click()
    model = page.locator("#t2i_model input")
    model.wait_for(state="visible")
    page.wait_for_function(f"() => document.querySelector('#t2i_model input').value.includes('{RUN}')",
                           timeout=30_000)
    model.click()
    assert page.get_by_role("option", name=f"{RUN} (run)").count() == 1
