"""AOTInductor packages (`engine.pt2`) compiled without their weights.

The package holds only compiled code; the weights are handed in at load as the front's own
tensors (`user_managed=True`), so every shape's package shares one copy of the weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch


class AOTIEngine:
    def __init__(self, path: Path, constants: Mapping[str, torch.Tensor]):
        self._runner = torch._inductor.aoti_load_package(str(path))
        names = self._runner.get_constant_fqns()
        missing = [n for n in names if n not in constants]
        if missing:
            raise RuntimeError(f"{path}: the model has no tensors for {', '.join(missing[:5])}")
        self._runner.load_constants({n: constants[n] for n in names}, check_full_update=True, user_managed=True)

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        out = self._runner(*inputs)
        return out[0] if isinstance(out, (list, tuple)) else out
