"""Engine precisions and what each means for tensors at the engine's boundary."""

from __future__ import annotations

from enum import Enum

import torch


class Precision(str, Enum):
    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"
    FP8 = "fp8"  # FP8 weights/activations in the linear layers, bf16 elsewhere
    NVFP4 = "nvfp4"  # 4-bit weights with FP8 block scales (Blackwell), bf16 elsewhere

    @property
    def dtype(self) -> torch.dtype:
        """dtype of the engine's inputs and outputs (and of the eager model it replaces)."""
        return {"fp32": torch.float32, "fp16": torch.float16}.get(self.value, torch.bfloat16)

    @classmethod
    def of_dtype(cls, dtype: torch.dtype) -> "Precision":
        for p in (cls.FP32, cls.FP16, cls.BF16):
            if p.dtype == dtype:
                return p
        raise ValueError(f"no precision for dtype {dtype}")

    @property
    def quantized(self) -> bool:
        return self in (Precision.FP8, Precision.NVFP4)


PRECISIONS = tuple(p.value for p in Precision)
