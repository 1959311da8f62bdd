"""Engine precisions and every per-precision fact, in one table.

Who reads what: the front and the engines (`dtype`), the builder's parity gate and `wan-build
verify` (`parity_tolerance`), each backend's "can this machine build or run it" and the planner's
GPU table (`min_compute_capability`), the memory model (`linear_weight_bytes`,
`activation_bytes`), ONNX writers and the ONNX Runtime binding (`ONNX_ELEMENT_TYPES`).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import torch


class Precision(str, Enum):
    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"
    FP8 = "fp8"  # FP8 weights/activations in the linear layers, bf16 elsewhere
    NVFP4 = "nvfp4"  # 4-bit weights with FP8 block scales (Blackwell), bf16 elsewhere
    INT8 = "int8"  # int8 weights/activations in the linear layers (W8A8, runtime.int8), bf16 elsewhere

    @property
    def facts(self) -> "PrecisionFacts":
        return FACTS[self]

    @property
    def dtype(self) -> torch.dtype:
        """dtype of the engine's inputs and outputs (and of the eager model it replaces)."""
        return self.facts.dtype

    @property
    def quantized(self) -> bool:
        return self.facts.quantized

    @property
    def parity_tolerance(self) -> float:
        return self.facts.parity_tolerance

    @classmethod
    def of_dtype(cls, dtype: torch.dtype) -> "Precision":
        for p in (cls.FP32, cls.FP16, cls.BF16):
            if p.dtype == dtype:
                return p
        raise ValueError(f"no engine precision holds {dtype}; engines are built for "
                         + ", ".join(str(p.dtype).replace("torch.", "") for p in (cls.FP32, cls.FP16, cls.BF16)))

    def hardware_problem(self, device: torch.device | str, capability: tuple[int, int] | None) -> str | None:
        """Why a device of this kind and compute capability cannot run this precision's kernels, or None."""
        need = self.facts.min_compute_capability
        if need is None:
            return None
        if torch.device(device).type != "cuda" or capability is None:
            return (f"{self.value} needs an NVIDIA GPU of compute capability {need[0]}.{need[1]} or newer "
                    f"({self.facts.hardware}); this is {torch.device(device).type}")
        if tuple(capability) < need:
            return (f"{self.value} needs compute capability {need[0]}.{need[1]} or newer ({self.facts.hardware}); "
                    f"this GPU is {capability[0]}.{capability[1]}")
        return None


@dataclass(frozen=True)
class PrecisionFacts:
    dtype: torch.dtype  # at the engine's boundary, and of the eager model it replaces
    quantized: bool  # the linear layers of the middle blocks hold quantized weights
    # Relative error allowed against the eager static model at the same precision. Measured on the
    # CPU for the tiny presets: fp32 ONNX Runtime 2.8e-7, fp32 AOTInductor 2e-7 (reassociation only);
    # fp16 ONNX Runtime vs eager fp16 ~1e-3; bf16 AOTInductor vs eager bf16 ~3e-3 (fusions round
    # intermediates at other points). fp8 against Model Optimizer's fake quantization; nvfp4 against
    # the emulation of the engine's arithmetic: in bf16, upstream rounding flips some FP4 codes (bf16
    # vs fp32 emulation 2.0% at 384 tokens; ONNX's reference evaluator vs the emulation 7.9-8.1%).
    parity_tolerance: float
    linear_weight_bytes: float  # per weight in the quantized layers (the rest keeps 16 bits)
    activation_bytes: int  # activations stay 16-bit when the weights are quantized
    min_compute_capability: tuple[int, int] | None  # None: runs on any device
    hardware: str = ""  # in words, for messages


FACTS: dict[Precision, PrecisionFacts] = {
    Precision.FP32: PrecisionFacts(torch.float32, False, 1e-5, 4.0, 4, None),
    Precision.FP16: PrecisionFacts(torch.float16, False, 1e-2, 2.0, 2, None),
    Precision.BF16: PrecisionFacts(torch.bfloat16, False, 2e-2, 2.0, 2, None),
    # fp8: one byte plus a per-tensor or per-channel scale
    Precision.FP8: PrecisionFacts(torch.bfloat16, True, 5e-2, 1.0, 2, (8, 9), "Ada, Hopper, Blackwell"),
    # nvfp4: half a byte plus one fp8 scale per 16 weights
    Precision.NVFP4: PrecisionFacts(torch.bfloat16, True, 1e-1, 0.5 + 1 / 16, 2, (10, 0), "Blackwell"),
    # int8: one byte plus a per-channel scale; runs on CPUs too (torch._int_mm), on CUDA from Turing (7.5,
    # checked by runtime.int8 and the planner's GPU table); against the eager INT8 model (the same integers)
    Precision.INT8: PrecisionFacts(torch.bfloat16, True, 5e-2, 1.0, 2, None, "int8 tensor cores (Turing or newer) or a CPU"),
}

PRECISIONS = tuple(p.value for p in Precision)

# ONNX TensorProto element types, for every writer of ONNX graphs and the ONNX Runtime binding.
ONNX_ELEMENT_TYPES = {torch.float32: 1, torch.uint8: 2, torch.int8: 3, torch.int32: 6, torch.int64: 7,
                      torch.bool: 9, torch.float16: 10, torch.bfloat16: 16, torch.float8_e4m3fn: 17}
ONNX_FLOAT = ONNX_ELEMENT_TYPES[torch.float32]
ONNX_FLOAT8E4M3FN = ONNX_ELEMENT_TYPES[torch.float8_e4m3fn]
ONNX_FLOAT4E2M1 = 23  # no torch dtype
