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


# ----------------------------------------------------------------------------------------------- op registration

_OPS = [
    *(
        f"na{d}d_{op}"
        for d in (1, 2)
        for op in (
            "qk",
            "av",
            "inverse",
            "rpb_grad",
            "fused_forward",
            "fused_backward",
            "qkv_fused_forward",
            "qkv_fused_backward",
        )
    ),
    # CPU kernels only; a CUDA build registers an error naming the CUDA path instead (native/cuda_registration.cpp).
    *(f"na{d}d_fused_{p}_with_attn" for d in (1, 2) for p in ("forward", "backward")),
    *(f"na{d}d_qkv_fused_{p}_with_attn" for d in (1, 2) for p in ("forward", "backward")),
    "ms_deform_attn_forward",
    "ms_deform_attn_backward",
]


def _op_names() -> list[str]:
    import dinat_m2f.ops  # noqa: F401  (fake kernels and autograd)

    return [f"dinat_m2f::{name}" for name in _OPS]


@pytest.mark.parametrize("key", ["CPU", "CUDA", "Meta", "Autograd"])
def test_every_op_has_a_kernel_for_every_dispatch_key(key):
    """CPU and CUDA kernels for both op families (an error kernel for CUDA in a CPU-only build), fakes, autograd."""
    missing = [name for name in _op_names() if not torch._C._dispatch_has_kernel_for_dispatch_key(name, key)]
    assert not missing, f"no {key} kernel for {missing}"


def test_ops_are_defined_in_one_library():
    """One TORCH_LIBRARY(dinat_m2f, ...) owns every schema; device files only add kernels."""
    import re
    from pathlib import Path

    native = Path(__file__).resolve().parent.parent / "native"
    sources = [p for p in native.rglob("*") if p.suffix in {".cpp", ".cu", ".h", ".cuh"}]
    owners = [p.name for p in sources if re.search(r"^TORCH_LIBRARY\(dinat_m2f", p.read_text(), re.M)]
    fragments = [p.name for p in sources if re.search(r"^TORCH_LIBRARY_FRAGMENT\(", p.read_text(), re.M)]
    assert owners == ["registration.cpp"] and not fragments, (owners, fragments)


@pytest.mark.skipif("cuda" in dinat_m2f.build_info()["backends"], reason="this build has CUDA kernels")
@pytest.mark.parametrize("name", _OPS)
def test_cuda_kernel_of_a_cpu_only_build_says_how_to_fix_it(name):
    """What a CUDA input meets in a build without CUDA kernels: the op's name and the fix, for both op families."""
    op = getattr(torch.ops.dinat_m2f, name).default
    args = [torch.zeros(1) if arg.type.kind() in ("TensorType", "OptionalType") else 1 for arg in op._schema.arguments]
    cuda_only = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)
    with pytest.raises(RuntimeError, match=rf"dinat_m2f::{name}: .* built without CUDA kernels\. Rebuild it"):
        op.redispatch(cuda_only, *args)
