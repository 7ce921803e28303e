"""Locate the shared reference fixtures (kept beside the clone in ``shared/``, not in git)."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def shared_fixture_dir() -> Path:
    """The StyleGAN2-ADA parity fixtures: ``$STUDIO_SHARED_DIR/fixtures/...`` if set, else the
    team's ``shared/`` folder beside the clone, else the copy in ``tests/fixtures/``."""
    candidates = [REPO_ROOT.parent / "shared", REPO_ROOT / "tests"]
    if "STUDIO_SHARED_DIR" in os.environ:
        candidates.insert(0, Path(os.environ["STUDIO_SHARED_DIR"]))
    for base in candidates:
        folder = base / "fixtures" / "stylegan2_ada_parity"
        if (folder / "README.md").is_file():
            return folder
    raise FileNotFoundError(
        "StyleGAN2-ADA parity fixtures not found in "
        + ", ".join(str(b / "fixtures" / "stylegan2_ada_parity") for b in candidates)
        + "; set STUDIO_SHARED_DIR to the folder holding fixtures/"
    )
