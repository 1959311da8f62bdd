"""Static model -> AOTInductor package (`engine.pt2`), compiled without its weights.

`aot_inductor.package_constants_in_so=False` leaves the weights out of the package: it holds
compiled code only, and the runtime hands in the model's own tensors at load. Several shapes (and
both experts of a two-expert model, if they ever share a shape's code) then use one copy of the
weights. The option is marked experimental in torch; the parity gate checks every package.
"""

from __future__ import annotations

from pathlib import Path

import torch

from runtime.manifest import AOTI_FILE
from runtime.static import StaticWanTransformer

from .export import quiet_torch



def compile_aoti(model: StaticWanTransformer, inputs: tuple[torch.Tensor, ...], folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / AOTI_FILE
    with torch.no_grad(), quiet_torch():
        program = torch.export.export(model, inputs)
        torch._inductor.aoti_compile_and_package(
            program, package_path=str(path), inductor_configs={"aot_inductor.package_constants_in_so": False})
    return path
