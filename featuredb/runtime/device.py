"""What the device can do fast, read from its properties (never from timing, so runs are repeatable)."""

from __future__ import annotations

from pathlib import Path

import torch


def cpu_has_fast_bf16() -> bool:
    """Native bfloat16 matmuls (AVX512-BF16 or AMX): there a bf16 product is ~3x faster than float32,
    elsewhere it is emulated and slower. Read from the CPU flags."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def fast_bf16(device: torch.device | str) -> bool:
    """bfloat16 matmuls are faster than float32 ones on `device` (any CUDA GPU with bf16, or such a CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_has_fast_bf16()
