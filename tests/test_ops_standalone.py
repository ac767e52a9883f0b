"""dinat_m2f.ops stands alone: it imports with torch only, and the non-native parts import without dinat_m2f._C.

Each check runs in a fresh interpreter in which the missing pieces are made unimportable (``sys.modules[name] =
None``), so nothing imported earlier by the test session can hide a dependency.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DETECTION_STACK = ("detectron2", "fvcore", "pycocotools", "scipy", "cv2", "panopticapi")


def _run(code: str, env: dict | None = None) -> subprocess.CompletedProcess:
    child_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    child_env.pop("TRITON_INTERPRET", None)
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=child_env, capture_output=True, text=True
    )
    assert result.returncode == 0, f"child failed:\n{result.stdout}\n{result.stderr}"
    return result


def test_ops_import_and_run_without_the_detection_stack():
    _run(
        f"""
        import sys
        for name in {DETECTION_STACK!r}:
            sys.modules[name] = None  # import of these now raises ImportError
        import torch
        import dinat_m2f.ops as ops
        from dinat_m2f.ops import reference

        q, k, v = (torch.randn(1, 2, 7, 9, 8) for _ in range(3))
        out = ops.na2d(q, k, v, 3, 2, backend="reference")
        torch.testing.assert_close(out, reference.na2d(q, k, v, 3, 2))
        assert "reference" in ops.available_backends("cpu")
        loaded = sorted(n for n in sys.modules if n.split(".")[0] in {DETECTION_STACK!r} and sys.modules[n])
        assert not loaded, loaded

        import dinat_m2f
        try:
            dinat_m2f.get_cfg()
        except ImportError as exc:
            assert "detectron2 is needed for dinat_m2f.get_cfg" in str(exc), exc
        else:
            raise AssertionError("get_cfg without detectron2 did not raise")
        """
    )


def test_package_imports_without_the_extension():
    _run(
        """
        import sys
        sys.modules["dinat_m2f._C"] = None  # as if the extension was never built
        import torch
        import dinat_m2f
        from dinat_m2f import data, modeling, ops  # dataset registration and the model code import
        from dinat_m2f._ext import ExtensionUnavailableError
        from dinat_m2f.ops import reference

        cfg = dinat_m2f.get_cfg()
        assert cfg.MODEL.DINAT.NA_BACKEND == ""
        from detectron2.data import DatasetCatalog
        assert "coco_2017_train_panoptic" in DatasetCatalog.list() or len(DatasetCatalog.list()) > 0

        q, k, v = (torch.randn(1, 2, 7, 9, 8) for _ in range(3))
        torch.testing.assert_close(ops.na2d(q, k, v, 3, backend="reference"), reference.na2d(q, k, v, 3))
        assert "native" not in ops.available_backends("cpu")
        try:
            ops.na2d(q, k, v, 3, backend="native")
        except ExtensionUnavailableError as exc:
            assert "make build" in str(exc), exc
        else:
            raise AssertionError("the native op without _C did not raise")
        """
    )


def test_triton_on_cpu_without_interpreter_is_a_clear_error():
    _run(
        """
        import torch
        from dinat_m2f import ops

        q, k, v = (torch.randn(1, 2, 7, 9, 16) for _ in range(3))
        assert "triton" not in ops.available_backends("cpu")
        try:
            ops.na2d(q, k, v, 3, backend="triton")
        except RuntimeError as exc:
            assert "backend 'triton'" in str(exc) and "TRITON_INTERPRET=1" in str(exc), exc
        else:
            raise AssertionError("backend='triton' on CPU without the interpreter did not raise")
        """
    )


def test_environment_variable_chooses_and_is_checked():
    _run(
        """
        import torch
        from dinat_m2f import ops
        from dinat_m2f.ops import reference

        q, k, v = (torch.randn(1, 2, 7, 9, 8, dtype=torch.float64) for _ in range(3))
        torch.testing.assert_close(ops.na2d(q, k, v, 3), reference.na2d(q, k, v, 3))
        """,
        env={"DINAT_M2F_NA_BACKEND": "reference"},
    )
    result = subprocess.run(
        [sys.executable, "-c", "import torch; from dinat_m2f import ops; ops.na2d(*torch.randn(3, 1, 1, 7, 7, 8), 3)"],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), "DINAT_M2F_NA_BACKEND": "cudnn"},
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0
    assert "DINAT_M2F_NA_BACKEND names neighborhood-attention backend 'cudnn'" in result.stderr


def test_config_key_chooses_the_backend_of_every_attention_layer(monkeypatch):
    import torch
    from detectron2.modeling import ShapeSpec

    import dinat_m2f
    from dinat_m2f.modeling.backbone.d2_backbone import D2DiNAT
    from dinat_m2f.modeling.backbone.na_attention import NeighborhoodAttention2D
    from dinat_m2f.ops import reference

    cfg = dinat_m2f.get_cfg()
    cfg.MODEL.DINAT.EMBED_DIM = 16
    cfg.MODEL.DINAT.DEPTHS = [1, 1, 1, 1]
    cfg.MODEL.DINAT.NUM_HEADS = [1, 2, 2, 4]
    cfg.MODEL.DINAT.KERNEL_SIZE = 3
    cfg.MODEL.DINAT.NA_BACKEND = "reference"
    model = D2DiNAT(cfg, ShapeSpec(channels=3)).eval()
    layers = [m for m in model.modules() if isinstance(m, NeighborhoodAttention2D)]
    assert len(layers) == 4 and {m.backend for m in layers} == {"reference"}

    calls = []
    monkeypatch.setattr(reference, "na2d", lambda *a, **kw: calls.append(1) or torch.zeros_like(a[0]))
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
    assert len(calls) == 4  # every layer went through the reference

    cfg.MODEL.DINAT.NA_BACKEND = "cudnn"
    with pytest.raises(ValueError, match="MODEL.DINAT.NA_BACKEND must be '' .* got 'cudnn'"):
        D2DiNAT(cfg, ShapeSpec(channels=3))
    cfg.MODEL.DINAT.NA_BACKEND = "triton"
    cfg.MODEL.DINAT.ATTN_DROP_RATE = 0.1
    with pytest.raises(ValueError, match="ATTN_DROP_RATE > 0 needs the attention weights"):
        D2DiNAT(cfg, ShapeSpec(channels=3))
