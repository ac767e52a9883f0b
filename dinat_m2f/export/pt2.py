"""torch.export of the model with our native ops (their fake kernels make them traceable), and AOTInductor.

The ``.pt2`` files hold calls to ``torch.ops.dinat_m2f.*``: loading one needs this package's compiled extension
(``load_pt2`` / ``load_aoti`` load it first).
"""

from __future__ import annotations

import torch
from torch import nn

from dinat_m2f._ext import load_extension
from dinat_m2f.export.core import MaskFormerCore
from dinat_m2f.export.shapes import dynamic_image_shapes

__all__ = ["compile_aoti", "export_program", "load_aoti", "load_pt2", "save_pt2"]


def export_program(
    model: nn.Module, example: torch.Tensor, min_size: int, max_size: int
) -> torch.export.ExportedProgram:
    """``torch.export`` of ``MaskFormerCore(model)`` with dynamic H and W in [min_size, max_size]."""
    load_extension()
    model.eval()
    core = MaskFormerCore(model).eval()
    with torch.no_grad():
        return torch.export.export(
            core, (example,), dynamic_shapes=dynamic_image_shapes(model, min_size, max_size), strict=False
        )


def save_pt2(program: torch.export.ExportedProgram, path: str) -> str:
    torch.export.save(program, path)
    return path


def load_pt2(path: str) -> nn.Module:
    """The exported program of ``path`` as a callable module ``image -> (pred_logits, pred_masks)``."""
    load_extension()  # registers torch.ops.dinat_m2f.* (and their fake kernels) before deserialising
    return torch.export.load(path).module()


def compile_aoti(program: torch.export.ExportedProgram, package_path: str) -> str:
    """AOTInductor: compile the exported program to a shared library packaged at ``package_path`` (.pt2)."""
    return torch._inductor.aoti_compile_and_package(program, package_path=package_path)


def load_aoti(package_path: str):
    """A callable ``image -> [pred_logits, pred_masks]`` of an AOTInductor package."""
    load_extension()
    return torch._inductor.aoti_load_package(package_path)
