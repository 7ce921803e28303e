"""The Portrait world tab's handler: what the page shows, and the messages bad input gets."""

import zipfile

import numpy as np
import pytest

from pipelines.data.portrait_world import ATTRIBUTES
from studio.tabs.portrait_world import RANDOM, _bundle, render_portrait

ALL_RANDOM = {name: RANDOM for name in ATTRIBUTES}


def test_random_attributes_are_drawn_from_the_seed_and_fixed_ones_kept():
    a = render_portrait(ALL_RANDOM, "5", 64, 0.5)
    b = render_portrait(ALL_RANDOM, "5", 64, 0.5)
    assert a["attributes"] == b["attributes"]
    assert np.array_equal(np.asarray(a["portrait"].image), np.asarray(b["portrait"].image))
    fixed = render_portrait({**ALL_RANDOM, "hair_color": "pink", "glasses": "yes"}, "5", 64, 0.5)
    assert fixed["attributes"].hair_color == "pink" and fixed["attributes"].glasses == "yes"
    assert fixed["portrait"].image.size == (64, 64)


def test_partial_sketch_follows_the_progress_slider():
    empty = render_portrait(ALL_RANDOM, "1", 128, 0.0)["sketch"]
    half = render_portrait(ALL_RANDOM, "1", 128, 0.5)["sketch"]
    full = render_portrait(ALL_RANDOM, "1", 128, 1.0)
    ink = lambda im: int((np.asarray(im) < 128).sum())  # noqa: E731
    assert ink(empty) == 0 < ink(half) < ink(full["sketch"])
    assert np.array_equal(np.asarray(full["sketch"]), np.asarray(full["portrait"].line_art))


@pytest.mark.parametrize("choices,seed,size,fragment", [
    ({**ALL_RANDOM, "hair_color": "plaid"}, "1", 128, "black"),     # names the allowed values
    ({**ALL_RANDOM, "eyes": "blue"}, "1", 128, "eyes"),
    (ALL_RANDOM, "twelve", 128, "whole number"),
    (ALL_RANDOM, "-3", 128, "between 0 and"),
    (ALL_RANDOM, "1", 1024, "512"),
    (ALL_RANDOM, "1", "big", "whole number of pixels"),
])
def test_bad_input_is_a_readable_value_error(choices, seed, size, fragment):
    with pytest.raises(ValueError, match=fragment):
        render_portrait(choices, seed, size, 0.5)


def test_download_bundle_holds_image_line_art_sketch_caption_and_labels(tmp_path):
    result = render_portrait(ALL_RANDOM, "3", 64, 0.5)
    with zipfile.ZipFile(_bundle(result)) as z:
        names = set(z.namelist())
        assert {"portrait_seed3.png", "portrait_seed3_lineart.png", "portrait_seed3_sketch.png",
                "portrait_seed3.txt", "portrait_seed3.json"} <= names
        assert z.read("portrait_seed3.txt").decode().strip() == result["portrait"].caption
