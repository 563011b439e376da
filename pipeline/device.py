"""Where and in what precision the model runs: one choice, made from `train.device` and
`train.precision`, which every stage honours."""

import contextlib
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


def uses_bf16(device: torch.device, precision: str) -> bool:
    """`auto`: bf16 on CUDA and on a CPU that multiplies bf16 natively (AVX512-BF16 or AMX)."""
    native = device.type == "cuda" or (device.type == "cpu" and cpu_supports_bf16())
    return precision == "bfloat16" or (precision == "auto" and native)


def autocast(device: torch.device, precision: str):
    """bf16 autocast where `uses_bf16` says; float32 otherwise."""
    if not uses_bf16(device, precision):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def uses_compile(device: torch.device, setting: bool | str) -> bool:
    """`auto` compiles on CUDA only: on 2 CPU cores compiling took 20 to 40 s of a 2-minute run."""
    return setting is True or (setting == "auto" and device.type == "cuda")


def cpu_supports_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX); x86 Linux only."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


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
