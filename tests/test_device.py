import os
import subprocess
import sys

import pytest
import torch

from pipeline.device import (
    BF16_BATCH_SIZE,
    FLOAT32_BATCH_SIZE,
    auto_batch_size,
    cpu_flags,
    cpu_supports_bf16,
    newton_schulz_dtype,
    onednn_isa_cap,
    resolved_precision,
)

CPU = torch.device("cpu")
BF16_FLAGS = {"avx512_bf16", "amx_bf16"}


def onednn_isa(env: dict[str, str]) -> str:
    """The instruction set oneDNN names when a fresh process multiplies bf16 matrices ('' if it
    never runs one: torch then multiplies bf16 without it, emulated)."""
    code = "import torch; a = torch.randn(64, 64).bfloat16(); a @ a"
    env = {k: v for k, v in os.environ.items() if "MAX_CPU_ISA" not in k} | {"ONEDNN_VERBOSE": "1"} | env
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    return next((line.split(",isa:", 1)[1] for line in out.splitlines() if ",isa:" in line), "")


@pytest.fixture
def no_cap(monkeypatch):
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    return monkeypatch


@pytest.mark.parametrize(
    "env", [{}, {"ONEDNN_MAX_CPU_ISA": "avx2"}, {"DNNL_MAX_CPU_ISA": "AVX2"}, {"ONEDNN_MAX_CPU_ISA": " AVX2"}]
)
def test_the_bf16_check_agrees_with_what_onednn_runs(no_cap, env):
    for name, value in env.items():
        no_cap.setenv(name, value)
    assert ("bfloat16" in onednn_isa(env)) == cpu_supports_bf16()


@pytest.mark.parametrize("name", ["ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"])
@pytest.mark.parametrize("isa", ["AVX2", "avx512_core", "avx2_vnni"])
def test_onednn_capped_below_bf16_products_makes_the_run_float32(no_cap, name, isa):
    no_cap.setenv(name, isa)
    assert onednn_isa_cap() == isa.upper()
    assert not cpu_supports_bf16()
    assert auto_batch_size("cpu", "auto") == FLOAT32_BATCH_SIZE
    assert newton_schulz_dtype(CPU, "auto") == torch.float32
    assert resolved_precision(CPU, "auto") == {
        "resolved.autocast_dtype": "float32",
        "resolved.newton_schulz_dtype": "float32",
    }


@pytest.mark.parametrize("isa", ["AVX512_CORE_BF16", "AVX512_CORE_AMX", "ALL", "", " AVX2"])
def test_a_cap_at_or_above_bf16_products_or_one_onednn_ignores_changes_nothing(no_cap, isa):
    no_cap.setenv("ONEDNN_MAX_CPU_ISA", isa)
    native = bool(BF16_FLAGS & cpu_flags())
    assert onednn_isa_cap() is None
    assert cpu_supports_bf16() == native
    assert auto_batch_size("cpu", "auto") == (BF16_BATCH_SIZE if native else FLOAT32_BATCH_SIZE)
