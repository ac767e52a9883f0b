"""The foundation: the compiled extension loads and reports its build; detectron2 imports on today's stack."""

import importlib

import pytest
import torch

import dinat_m2f


def test_extension_loads_and_reports_build():
    info = dinat_m2f.build_info()
    assert "cpu" in info["backends"]
    assert info["torch_version"] == torch.__version__
    assert "-O3" in info["cxx_flags"]
    if "cuda" in info["backends"]:
        assert info["cuda_archs"]


@pytest.mark.parametrize(
    "module",
    [
        "detectron2.modeling",
        "detectron2.evaluation",
        "detectron2.data",
        "detectron2.engine",
        "detectron2.projects.deeplab",
        "panopticapi.evaluation",
        "cityscapesscripts",
        "pycocotools.cocoeval",
        "fvcore.nn",
    ],
)
def test_dependency_imports(module):
    importlib.import_module(module)


def test_detectron2_placeholder_names_the_missing_op():
    from detectron2 import _C

    if not getattr(_C, "__dinat_m2f_placeholder__", False):
        pytest.skip("a complete detectron2 build is installed")
    with pytest.raises(RuntimeError, match="built without its compiled ops: deform_conv_forward is unavailable"):
        _C.deform_conv_forward  # noqa: B018


def test_detectron2_mends_hold():
    import numpy as np
    from detectron2.structures.masks import polygons_to_bitmask

    mask = polygons_to_bitmask([np.array([0, 0, 4, 0, 4, 4, 0, 4], dtype=float)], 6, 6)
    assert mask.dtype == bool and mask.sum() > 0


def test_missing_extension_error_says_how_to_rebuild(monkeypatch):
    import sys

    from dinat_m2f import _ext

    _ext.load_extension.cache_clear()
    monkeypatch.setitem(sys.modules, "dinat_m2f._C", None)  # makes `from dinat_m2f import _C` fail
    monkeypatch.delattr(dinat_m2f, "_C", raising=False)
    try:
        with pytest.raises(_ext.ExtensionUnavailableError, match="make build"):
            _ext.load_extension()
    finally:
        _ext.load_extension.cache_clear()


def test_extension_built_for_another_torch_is_refused(monkeypatch):
    import types

    from dinat_m2f import _ext

    fake = types.SimpleNamespace(build_info=lambda: {"torch_version": "1.0.0"})
    _ext.load_extension.cache_clear()
    monkeypatch.setattr(dinat_m2f, "_C", fake, raising=False)
    monkeypatch.setitem(__import__("sys").modules, "dinat_m2f._C", fake)
    try:
        with pytest.raises(_ext.ExtensionUnavailableError, match="built for torch 1.0.0 but torch .* is installed"):
            _ext.load_extension()
    finally:
        _ext.load_extension.cache_clear()


def test_loading_the_extension_registers_autograd_and_fake_kernels():
    """Whoever loads the extension first, torch.ops.dinat_m2f.* gets its Python-side autograd and fake kernels."""
    import subprocess
    import sys

    code = (
        "import torch\n"
        "from dinat_m2f._ext import load_extension\n"
        "load_extension()\n"
        "q = torch.randn(1, 1, 5, 5, 4, requires_grad=True)\n"
        "torch.ops.dinat_m2f.na2d_qk(q, q, None, 3, 1).sum().backward()\n"
        "assert q.grad is not None\n"
        "from torch._subclasses.fake_tensor import FakeTensorMode\n"
        "with FakeTensorMode():\n"
        "    out = torch.ops.dinat_m2f.na2d_qk(torch.empty(1, 1, 5, 5, 4), torch.empty(1, 1, 5, 5, 4), None, 3, 1)\n"
        "assert tuple(out.shape) == (1, 1, 5, 5, 9), out.shape\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
