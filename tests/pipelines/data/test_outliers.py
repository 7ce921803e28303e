"""Outlier images: fetching, error messages, compositing, and mixing into the portrait dataset."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.data import outliers as outliers_module
from pipelines.data.datasets import PortraitDataset
from pipelines.data.outliers import FETCH_COMMAND, OutlierImages, fetch_outliers, outlier_dir


@pytest.fixture(scope="session")
def outliers() -> OutlierImages:
    """The real outlier images from the default folder (CI fetches them before the tests)."""
    try:
        return OutlierImages()
    except FileNotFoundError:
        fetch_outliers(quiet=True)
        return OutlierImages()


def _png_bytes(colour: tuple[int, int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGBA", (64, 64), colour).save(buf, format="PNG")
    return buf.getvalue()


def _fake_tarball(path: Path) -> Path:
    members = {
        "package/package.json": b"{}",
        "package/img/twitter/64/1f600.png": _png_bytes((250, 200, 0, 255)),
        "package/img/twitter/64/1f601.png": _png_bytes((0, 200, 250, 128)),
        "package/img/twitter/32/1f600.png": _png_bytes((0, 0, 0, 255)),
        "package/img/apple/64/1f600.png": _png_bytes((0, 0, 0, 255)),
    }
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_outlier_dir_follows_the_environment(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("STUDIO_OUTLIER_DIR", str(tmp_path / "x"))
    assert outlier_dir() == tmp_path / "x"
    monkeypatch.delenv("STUDIO_OUTLIER_DIR")
    assert outlier_dir().parts[-2:] == ("distillation-studio", "outliers")


def test_missing_images_say_how_to_fetch(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("STUDIO_OUTLIER_DIR", str(tmp_path / "absent"))
    with pytest.raises(FileNotFoundError, match="python -m pipelines.data.outliers --fetch"):
        OutlierImages()
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        OutlierImages(tmp_path)  # exists but holds no PNG
    assert FETCH_COMMAND == "python -m pipelines.data.outliers --fetch"


def test_fetch_without_npm_is_a_clear_error(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("STUDIO_OUTLIER_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(outliers_module.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="npm is not installed.*by hand.*npm pack emoji-datasource-twitter@16.0.0"):
        fetch_outliers(quiet=True)
    assert not (tmp_path / "cache").exists()


def test_fetch_extracts_only_the_64px_pngs(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("STUDIO_OUTLIER_DIR", str(tmp_path / "cache"))
    folder = fetch_outliers(quiet=True, tarball=_fake_tarball(tmp_path / "pkg.tgz"))
    assert sorted(p.name for p in folder.iterdir()) == ["1f600.png", "1f601.png"]
    # a second fetch finds the images and does not run npm
    monkeypatch.setattr(outliers_module.subprocess, "run", lambda *a, **k: pytest.fail("npm was run again"))
    assert fetch_outliers(quiet=True) == folder
    images = OutlierImages()
    assert len(images) == 2
    img = images.get(1, size=48, seed=0)
    assert img.mode == "RGB" and img.size == (48, 48)


def test_get_is_deterministic_and_varied(outliers: OutlierImages) -> None:
    assert len(outliers) == 3786
    a = outliers.get(100, size=64, seed=5)
    assert a.mode == "RGB" and a.size == (64, 64)
    assert a.tobytes() == outliers.get(100, size=64, seed=5).tobytes()
    assert a.tobytes() != outliers.get(100, size=64, seed=6).tobytes()
    assert outliers.get(0, size=128, seed=1).size == (128, 128)
    with pytest.raises(IndexError):
        outliers.get(len(outliers), size=64, seed=0)


def test_dataset_mixes_outliers_at_the_requested_rate(outliers: OutlierImages) -> None:
    ds = PortraitDataset(size=64, length=200, seed=1000, outlier_rate=0.25, outliers=outliers)
    flags = []
    for i in range(len(ds)):
        item = ds[i]
        flags.append(bool(item["is_outlier"]))
        if flags[-1]:
            assert torch.all(item["labels"] == -1) and item["caption"] == ""
            assert item["image"].shape == (3, 64, 64)
        else:
            assert torch.all(item["labels"] >= 0)
    assert 30 <= sum(flags) <= 70  # 50 expected; binomial sd ~6
    none = PortraitDataset(size=64, length=20, seed=0)
    assert not any(bool(none[i]["is_outlier"]) for i in range(20))
    every = PortraitDataset(size=64, length=10, seed=0, outlier_rate=1.0, outliers=outliers)
    assert all(bool(every[i]["is_outlier"]) for i in range(10))
    assert np.isfinite(every[0]["image"].numpy()).all()


def test_heldout_and_train_splits_use_disjoint_outlier_images():
    from pipelines.data.datasets import HELD_OUT_OUTLIER_EVERY, _outlier_index

    n = 3786
    train = {_outlier_index(k, n, "train") for k in range(n)}
    held = {_outlier_index(k, n, "heldout") for k in range(n)}
    assert train.isdisjoint(held)
    assert all(k % HELD_OUT_OUTLIER_EVERY == 0 for k in held)
    assert len(held) == len(range(0, n, HELD_OUT_OUTLIER_EVERY))
