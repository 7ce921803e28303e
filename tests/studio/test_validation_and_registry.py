import threading
import time

import pytest
import torch

from studio.registry import ModelRegistry, ModelSpec
from studio.validation import MAX_SEED, parse_seed
from pipelines.device import select_device


@pytest.mark.parametrize("text,value", [("0", 0), (" 42 ", 42), (7, 7), (str(MAX_SEED), MAX_SEED), (3.0, 3)])
def test_parse_seed_accepts_whole_numbers(text, value):
    assert parse_seed(text) == value


@pytest.mark.parametrize("text,fragment", [
    ("abc", "whole number"), ("", "enter a seed"), ("-1", "between 0 and"),
    (str(2**40), "between 0 and"), (1.5, "whole number"), ("1e3", "whole number"),
])
def test_parse_seed_refuses_with_a_message(text, fragment):
    with pytest.raises(ValueError, match=fragment):
        parse_seed(text)


def test_select_device_auto_is_cpu_here_and_refuses_absent_devices():
    assert select_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert select_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="not available here"):
            select_device("cuda")
    with pytest.raises(ValueError, match="unknown device"):
        select_device("tpu-9000")


def test_registry_loads_lazily_and_once_under_concurrency():
    calls = []

    def loader(location, device, dtype):
        calls.append(location)
        time.sleep(0.05)
        return {"location": location, "device": device}

    reg = ModelRegistry("cpu")
    reg.register(ModelSpec("m", "test", "local", "/some/folder", loader))
    assert calls == [] and not reg.is_loaded("m")
    results = []
    threads = [threading.Thread(target=lambda: results.append(reg.get("m"))) for _ in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert calls == ["/some/folder"]
    assert all(r is results[0] for r in results)
    assert reg.names("test") == ["m"] and reg.names("other") == []
    with pytest.raises(KeyError, match="unknown model"):
        reg.get("nope")
    with pytest.raises(ValueError, match="already registered"):
        reg.register(ModelSpec("m", "test", "local", "x", loader))
