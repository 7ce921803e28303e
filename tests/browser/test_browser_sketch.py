"""End to end: draw strokes on the Sketch to anime canvas and see the portraits follow them."""

import pytest

pytestmark = pytest.mark.browser


def _gallery_srcs(page) -> list[str]:
    return page.eval_on_selector_all("#sketch_gallery img", "els => els.map(e => e.src)")


def _wait_gallery_change(page, previous: list[str], timeout: int = 120_000) -> list[str]:
    page.wait_for_function(
        """(prev) => {
            const srcs = Array.from(document.querySelectorAll('#sketch_gallery img')).map(e => e.src);
            return srcs.length > 0 && JSON.stringify(srcs) !== JSON.stringify(prev);
        }""", arg=previous, timeout=timeout)
    return _gallery_srcs(page)


def _stroke(page, box, points) -> None:
    """One pen stroke through ``points`` given as fractions of the canvas."""
    xs = [box["x"] + fx * box["width"] for fx, _ in points]
    ys = [box["y"] + fy * box["height"] for _, fy in points]
    page.mouse.move(xs[0], ys[0])
    page.mouse.down()
    for x, y in zip(xs[1:], ys[1:]):
        page.mouse.move(x, y, steps=6)
    page.mouse.up()


def _canvas_box(page):
    canvas = page.locator("#sketch_canvas canvas").first
    canvas.wait_for(state="visible", timeout=60_000)
    box = canvas.bounding_box()
    assert box and box["width"] > 100 and box["height"] > 100, box
    return box


def test_strokes_on_the_canvas_update_the_portraits(page):
    page.get_by_role("tab", name="Sketch to anime").click()
    box = _canvas_box(page)
    page.get_by_text("Draw a face on the canvas", exact=False).first.wait_for(state="visible")
    page.locator("#sketch_canvas").get_by_role("button", name="Brush").click()
    assert _gallery_srcs(page) == []  # nothing drawn, nothing shown

    # the face outline: an arc from one temple round the chin to the other
    _stroke(page, box, [(0.3, 0.35), (0.3, 0.6), (0.4, 0.75), (0.5, 0.8), (0.6, 0.75), (0.7, 0.6), (0.7, 0.35)])
    first = _wait_gallery_change(page, [])
    assert len(first) >= 1

    # long hair falling on both sides: the portraits must change again
    _stroke(page, box, [(0.3, 0.3), (0.5, 0.15), (0.7, 0.3)])
    _stroke(page, box, [(0.28, 0.3), (0.2, 0.6), (0.2, 0.95)])
    _stroke(page, box, [(0.72, 0.3), (0.8, 0.6), (0.8, 0.95)])
    second = _wait_gallery_change(page, first)
    assert second != first
    assert "Traceback" not in page.content()
