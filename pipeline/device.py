"""Where and in what precision the model runs: one choice, made from `train.device` and
`train.precision`, which every stage honours."""

import contextlib
import os
from pathlib import Path

import torch

from pipeline.errors import PipelineError


def pick_device(name: str) -> torch.device:
    if name != "auto":
        device = torch.device(name)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise PipelineError(f"train.device is '{name}' but CUDA is not available here")
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise PipelineError(f"train.device is '{name}' but MPS is not available here")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def multiplies_bf16(device: torch.device) -> bool:
    """CUDA, or a CPU with bf16 instructions (AVX512-BF16 or AMX); elsewhere bf16 is emulated."""
    return device.type == "cuda" or (device.type == "cpu" and cpu_supports_bf16())


def uses_bf16(device: torch.device, precision: str) -> bool:
    """`auto`: bf16 on CUDA and on a CPU that multiplies bf16 natively (AVX512-BF16 or AMX)."""
    return precision == "bfloat16" or (precision == "auto" and multiplies_bf16(device))


def newton_schulz_dtype(device: torch.device, precision: str) -> torch.dtype:
    """Muon's orthogonalisation in bf16 where the device multiplies it natively and the run is not
    pinned to float32; in float32 elsewhere, since emulated bf16 products are about 50x slower."""
    return torch.bfloat16 if precision != "float32" and multiplies_bf16(device) else torch.float32


# `train.batch_size: auto`: the windows a step where the run multiplies in bf16 (a bf16 CPU, CUDA)
# and where it multiplies in float32, for the default block of 128: 3,072 and 2,048 tokens. On 2
# AVX512-BF16 cores bf16 stepped 1.4x faster than float32, and the larger batch spends that on more
# tokens a step: a lower loss within nanoGPT's time there (docs/performance.md; AMX and GPUs not measured)
BF16_BATCH_SIZE = 24
FLOAT32_BATCH_SIZE = 16


def auto_batch_size(device_name: str, precision: str) -> int:
    """What `train.batch_size: auto` comes to for `train.device` and `train.precision` here."""
    device = pick_device("auto") if device_name == "auto" else torch.device(device_name)
    return BF16_BATCH_SIZE if uses_bf16(device, precision) else FLOAT32_BATCH_SIZE


def resolved_precision(device: torch.device, precision: str) -> dict[str, str]:
    """What `train.precision` came to on `device`: logged with a run's parameters."""
    autocast_dtype = torch.bfloat16 if uses_bf16(device, precision) else torch.float32
    dtypes = {"autocast": autocast_dtype, "newton_schulz": newton_schulz_dtype(device, precision)}
    return {f"resolved.{key}_dtype": str(dtype).removeprefix("torch.") for key, dtype in dtypes.items()}


def autocast(device: torch.device, precision: str):
    """bf16 autocast where `uses_bf16` says; float32 otherwise."""
    if not uses_bf16(device, precision):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def uses_compile(device: torch.device, setting: bool | str) -> bool:
    """`auto` compiles on CUDA only: on 2 CPU cores compiling took 20 to 40 s of a 2-minute run."""
    return setting is True or (setting == "auto" and device.type == "cuda")


def cpu_flags() -> set[str]:
    """The instruction-set flags of this CPU (x86 Linux's /proc/cpuinfo; empty elsewhere)."""
    try:
        return set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return set()


# oneDNN, which runs torch's bf16 matrix products on the CPU, below its first instruction set with
# bf16 products (AVX512_CORE_BF16): capped to one of these, a bf16 CPU emulates bf16 as AVX2 does
ONEDNN_ISAS_WITHOUT_BF16 = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI")


def onednn_isa_cap() -> str | None:
    """The instruction set that `ONEDNN_MAX_CPU_ISA` (or its old name `DNNL_MAX_CPU_ISA`) caps
    oneDNN to, if it is one without bf16 products."""
    cap = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "").upper()
    return cap if cap in ONEDNN_ISAS_WITHOUT_BF16 else None


def cpu_supports_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX) and oneDNN may use it."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags()) and onednn_isa_cap() is None


def setup_device(device: torch.device) -> None:
    """Let float32 matrix products use TF32 on CUDA (bf16 autocast covers most of them anyway)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


@contextlib.contextmanager
def cpu_threads(count: int):
    """Run with `count` CPU threads (0: leave torch's choice), then restore the previous count."""
    previous = torch.get_num_threads()
    if count:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def to_device(tokens: torch.Tensor, device: torch.device) -> torch.Tensor:
    """On CUDA, copy through pinned host memory without waiting for the copy to finish."""
    if device.type == "cuda":
        return tokens.pin_memory().to(device, non_blocking=True)
    return tokens.to(device)
