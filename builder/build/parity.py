"""The parity gate every engine passes before it is written, and that `wan-build verify` re-runs.

Per output: max abs error, relative error ||out - ref|| / ||ref|| and cosine similarity, against the
eager static model at the same precision on the same fixed-seed inputs. The tolerance of each
precision is in `runtime.precision` (one table); a failure fails the entry.
"""

from __future__ import annotations

import math

import torch

from runtime.manifest import ParityInfo
from runtime.precision import Precision

PARITY_SEED = 1234


def compare(out, ref, tolerance: float) -> ParityInfo:
    """`out` against `ref`; for several outputs (a stage engine's), each one, and the worst is kept."""
    if isinstance(out, (tuple, list)) or isinstance(ref, (tuple, list)):
        outs = tuple(out) if isinstance(out, (tuple, list)) else (out,)
        refs = tuple(ref) if isinstance(ref, (tuple, list)) else (ref,)
        if len(outs) != len(refs) or not outs:
            return ParityInfo(math.inf, math.inf, 0.0, tolerance)
        each = [compare(o, r, tolerance) for o, r in zip(outs, refs)]
        return max(each, key=lambda p: (p.relative, p.max_abs))
    if tuple(out.shape) != tuple(ref.shape):
        return ParityInfo(math.inf, math.inf, 0.0, tolerance)
    a, b = out.detach().double().cpu().flatten(), ref.detach().double().cpu().flatten()
    rel = ((a - b).norm() / b.norm().clamp_min(1e-30)).item()
    cos = torch.nn.functional.cosine_similarity(a, b, dim=0).item()
    max_abs = (a - b).abs().max().item() if a.numel() else 0.0
    finite = math.isfinite(rel) and math.isfinite(max_abs)
    return ParityInfo(max_abs if finite else math.inf, rel if finite else math.inf,
                      cos if math.isfinite(cos) else 0.0, tolerance)


def gate(out: torch.Tensor, ref: torch.Tensor, precision: str) -> ParityInfo:
    """`compare` at the precision's own tolerance."""
    return compare(out, ref, Precision(precision).parity_tolerance)
