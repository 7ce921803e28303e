"""Model cards: written with their figures; benchmark figures merge in without duplicates."""

import json

import pytest

from pipelines.cards import add_figures, read_card, write_card


def test_benchmark_figures_merge_into_a_card_once(tmp_path):
    write_card(tmp_path, title="G", task="generation", architecture="StyleGAN2", source="run x",
               command="python -m train", figures={"kimg": 10}, notes="Trained on the CPU.")
    add_figures(tmp_path, {"fd": 12.5, "label": "text is skipped", "flag": True}, command="python -m bench")
    add_figures(tmp_path, {"fd": 11.0, "gain": 2}, command="python -m bench --again")
    card = read_card(tmp_path)
    assert card["figures"] == {"kimg": 10, "benchmark_fd": 11.0, "benchmark_gain": 2}
    assert card["notes"] == "Trained on the CPU.\n\nFigures `benchmark_*` from `python -m bench --again`."
    readme = (tmp_path / "README.md").read_text()
    assert "| `benchmark_fd` | 11 |" in readme and "python -m bench --again" in readme
    assert json.loads((tmp_path / "card.json").read_text())["command"] == "python -m train"


def test_figures_need_a_card(tmp_path):
    with pytest.raises(FileNotFoundError, match="card.json"):
        add_figures(tmp_path, {"fd": 1.0})
