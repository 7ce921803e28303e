"""ZeroGPU: with the `spaces` package present, every GPU handler carries spaces.GPU with a duration
that grows with the work asked for; without it the handlers are left as they are."""

import functools
import importlib.machinery
import sys
import types

import pytest

from pipelines.stylegan_io import save_generator
from studio.registry import ModelRegistry, add_local
from studio.zerogpu import MAX_DURATION, gpu_handler, steps_duration
from tests._tiny import tiny_generator


@pytest.fixture
def fake_spaces(monkeypatch):
    """A stand-in `spaces` module whose GPU decorator records the requested duration."""
    module = types.ModuleType("spaces")
    module.__spec__ = importlib.machinery.ModuleSpec("spaces", None)

    def GPU(duration=60):  # noqa: N802 (the package's name)
        def decorate(fn):
            @functools.wraps(fn)
            def wrapper(*args, **kwargs):
                return fn(*args, **kwargs)
            wrapper.zerogpu_duration = duration
            return wrapper
        return decorate

    module.GPU = GPU
    monkeypatch.setitem(sys.modules, "spaces", module)
    return module


def test_without_spaces_handlers_are_unchanged():
    def handler(x):
        return x
    assert "spaces" not in sys.modules
    assert gpu_handler(30)(handler) is handler


def test_durations_grow_with_steps_and_are_capped():
    d = steps_duration(20, 0.05, 1, 2)
    assert d("gen", 100, 50) == 27
    assert d("gen", 1000, 350) > d("gen", 100, 50)
    assert d("gen", "not a number", None) == 20
    assert d("gen", 10**9, 0) == MAX_DURATION


def test_every_gpu_handler_of_the_app_carries_spaces_gpu(fake_spaces, tmp_path):
    from studio.app import build_app

    registry = ModelRegistry("cpu")
    add_local(registry, save_generator(tiny_generator(), tmp_path / "G"), name="tiny")
    demo = build_app(registry=registry, runs_dir=str(tmp_path / "runs"))
    by_api = {f.api_name: f.fn for f in demo.fns.values() if f.api_name}
    for api in ("render_portrait", "stylegan_sample", "stylegan_invert"):
        assert hasattr(by_api[api], "zerogpu_duration"), api
    invert = by_api["stylegan_invert"].zerogpu_duration
    # (generator, upload, align, method, steps, pti_steps): more steps ask for a longer GPU slot
    assert invert("tiny", "a.png", True, "w+", 1000, 350) > invert("tiny", "a.png", True, "w+", 100, 0) >= 20
    queued = [f for f in demo.fns.values() if getattr(f, "concurrency_id", None) == "gpu"]
    assert queued and all(hasattr(f.fn, "zerogpu_duration") for f in queued
                          if f.fn is not None and f.fn.__name__.startswith("on_"))


def test_work_duration_grows_with_steps_times_batch():
    from studio.zerogpu import work_duration

    d = work_duration(15, 1.0, 1, 2)
    assert d("model", 4, 8) == 15 + 32 and d("model", 1, 1) == 16
    assert d("model", "x", 8) == 15 and d("model", 10**4, 8) == MAX_DURATION
