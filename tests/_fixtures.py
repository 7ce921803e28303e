"""Locate the shared reference fixtures (kept beside the clone in ``shared/``, not in git)."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def shared_fixture_dir() -> Path:
    """``$STUDIO_SHARED_DIR/fixtures/stylegan2_ada_parity`` (default: ``<repo>/../shared``)."""
    shared = Path(os.environ.get("STUDIO_SHARED_DIR", REPO_ROOT.parent / "shared"))
    folder = shared / "fixtures" / "stylegan2_ada_parity"
    if not (folder / "README.md").is_file():
        raise FileNotFoundError(
            f"StyleGAN2-ADA parity fixtures not found at {folder}; put the shared/ folder beside the "
            "repository or set STUDIO_SHARED_DIR to its location"
        )
    return folder
