"""Training precision: the bf16 choice of --mixed_precision and the warning on CPUs that emulate bf16."""

from __future__ import annotations

import pytest
import torch

from pipelines.device import cpu_has_native_bf16, slow_bf16_warning, training_autocast

AVX2_ONLY = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse2 avx avx2 fma\n"
WITH_BF16 = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_tile amx_bf16\n"
ARM_BF16 = "processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\n"


@pytest.fixture
def cpuinfo(tmp_path):
    def write(text: str):
        path = tmp_path / "cpuinfo"
        path.write_text(text)
        return path
    return write


def test_native_bf16_is_read_from_the_cpu_flags(cpuinfo, tmp_path):
    assert cpu_has_native_bf16(cpuinfo(AVX2_ONLY)) is False
    assert cpu_has_native_bf16(cpuinfo(WITH_BF16)) is True
    assert cpu_has_native_bf16(cpuinfo(ARM_BF16)) is True
    assert cpu_has_native_bf16(tmp_path / "absent") is None        # flags unknown: no verdict


def test_warning_only_for_bf16_on_a_cpu_that_emulates_it(cpuinfo, tmp_path):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    note = slow_bf16_warning(cpu, True, cpuinfo(AVX2_ONLY))
    assert note and "--mixed_precision no" in note and "slower" in note
    assert slow_bf16_warning(cpu, False, cpuinfo(AVX2_ONLY)) is None
    assert slow_bf16_warning(cpu, True, cpuinfo(WITH_BF16)) is None
    assert slow_bf16_warning(cuda, True, cpuinfo(AVX2_ONLY)) is None
    assert slow_bf16_warning(cpu, True, tmp_path / "absent") is None


def test_training_autocast_choice_and_refusal():
    cpu = torch.device("cpu")
    assert training_autocast(cpu, "auto")[0] is False               # auto: bf16 on CUDA only
    assert training_autocast(cpu, "no")[0] is False
    use_bf16, autocast = training_autocast(cpu, "bf16")
    with autocast():
        y = torch.nn.functional.linear(torch.randn(2, 4), torch.randn(3, 4))
    assert use_bf16 and y.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="mixed_precision must be auto, bf16 or no"):
        training_autocast(cpu, "fp8")
