"""python -m dinat_m2f.doctor: reports this machine, and exits non-zero with the fix on a run-time mismatch."""

from __future__ import annotations

import pytest

from dinat_m2f import _ext, doctor


def test_doctor_passes_on_a_working_build_and_probes_each_op(capsys):
    assert doctor.main([]) == 0
    out = capsys.readouterr().out
    assert "[  ok] extension dinat_m2f._C" in out and "matches this torch" in out
    assert "na2d on cpu float32" in out and "ms_deform_attn on cpu float32" in out
    for line in out.splitlines():
        if "on cpu float32" in line:
            assert line.startswith("[  ok]") and "max |error| vs reference" in line, line
    assert "available_backends()" in out and "detectron2" in out and "dataset root" in out
    assert "NA backend for cpu float32" in out and "fused: native, unfused: native" in out
    assert out.rstrip().endswith("no problem found.")


def test_a_missing_or_mismatched_extension_fails_with_the_fix(monkeypatch, capsys):
    def broken():
        raise _ext.ExtensionUnavailableError("dinat_m2f._C was built for torch 2.0.0 but torch X is installed.")

    monkeypatch.setattr(_ext, "build_info", broken)
    assert doctor.main([]) == 1
    out = capsys.readouterr().out
    assert "[FAIL] extension dinat_m2f._C" in out and "built for torch 2.0.0" in out and "fix: make build" in out


def test_an_illegal_instruction_in_the_kernels_is_caught_and_explained(monkeypatch):
    monkeypatch.setattr(doctor, "_PROBE", "import os, signal; os.kill(os.getpid(), signal.SIGILL)")
    results, why = doctor.probe_ops(["cpu"])
    assert results is None and "SIGILL" in why and "-march" in why
    checks = doctor._backends(_ext.build_info())
    failed = [c for c in checks if c.status == doctor.FAIL]
    assert len(failed) == 1 and "DINAT_M2F_CPU_ARCH" in failed[0].fix


@pytest.mark.parametrize(
    "gpu, built, runs",
    [
        ("9.0", "9.0", True),
        ("8.0", "9.0", False),
        ("8.6", "8.0;9.0", False),
        ("8.6", "8.0+PTX", True),
        ("9.0", "8.0 8.6+PTX", True),
        ("7.5", "8.0+PTX", False),
    ],
)
def test_gpu_arch_against_compiled_archs(gpu, built, runs):
    assert doctor.gpu_arch_runs(gpu, built) is runs


def test_a_gpu_whose_arch_was_not_compiled_fails(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: "Some GPU")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: (8, 6))
    (check,) = doctor._gpus({"backends": ["cpu", "cuda"], "cuda_archs": "9.0"})
    assert check.status == doctor.FAIL and "not this GPU's 8.6" in check.detail and '"9.0;8.6"' in check.fix
    (check,) = doctor._gpus({"backends": ["cpu"], "cuda_archs": ""})
    assert check.status == doctor.FAIL and "without its CUDA kernels" in check.detail


def test_registered_datasets_on_disk(tmp_path):
    from detectron2.data import DatasetCatalog, MetadataCatalog

    (tmp_path / "images").mkdir()
    for name, root in (("doctor_test_present", tmp_path / "images"), ("doctor_test_absent", tmp_path / "nope")):
        DatasetCatalog.register(name, list)
        MetadataCatalog.get(name).set(image_root=str(root))
    try:
        present, absent = doctor.dataset_status()
        assert "doctor_test_present" in present and "doctor_test_absent" in absent
    finally:
        for name in ("doctor_test_present", "doctor_test_absent"):
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)


def test_a_failing_kernel_is_a_failure_but_an_unsupported_dtype_is_not(monkeypatch):
    results = {
        "na2d|cpu|float32": ["error", "RuntimeError: CUDA error: no kernel image is available"],
        "na2d|cpu|float16": ["error", "RuntimeError: na2d: CPU kernels support float32, float64 and bfloat16"],
        "ms_deform_attn|cpu|float32": ["wrong", "max |error| vs reference 3.0e-01"],
    }
    monkeypatch.setattr(doctor, "probe_ops", lambda devices: (results, ""))
    checks = {c.name: c for c in doctor._backends(_ext.build_info())}
    assert checks["na2d on cpu float32"].status == doctor.FAIL
    assert checks["na2d on cpu float16"].status == doctor.INFO
    assert checks["ms_deform_attn on cpu float32"].status == doctor.FAIL


def test_an_unusable_backend_choice_is_a_failure_with_the_fix(monkeypatch, capsys):
    monkeypatch.setenv("DINAT_M2F_NA_BACKEND", "triton")  # Triton cannot run on the CPU (no interpreter here)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert doctor.main([]) == 1
    out = capsys.readouterr().out
    assert "[FAIL] NA backend for cpu float32" in out and "unset DINAT_M2F_NA_BACKEND" in out
