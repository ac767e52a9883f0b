"""``python -m dinat_m2f.doctor``: why a build does (not) work on this machine, and how to fix it.

Reports torch / CUDA, the GPU's architecture against the compiled ones, the CPU's instruction set against the
flags the CPU kernels were built with, which backend each op uses per device and dtype (each is run once on a tiny
input, in a child process so that an illegal instruction is caught, and compared with the pure-PyTorch
reference), whether the extension matches this torch, which compiled ops of detectron2 are missing, and which
registered datasets are on disk. Exits 1, printing the fix, on any mismatch that would fail at run time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import subprocess
import sys
from dataclasses import dataclass

from dinat_m2f.utils.cpu_info import cpu_flags

OK, WARN, FAIL, INFO = "ok", "warn", "FAIL", "info"

# CPU dtypes / CUDA dtypes the native kernels are written for (README); the probe tells whether each one works.
PROBE_DTYPES = {"cpu": ("float32", "float64", "bfloat16", "float16"), "cuda": ("float32", "float16", "bfloat16")}
_DETECTRON2_COMPILED_OPS = ("deform_conv_forward", "ROIAlignRotated_forward", "box_iou_rotated", "COCOevalAccumulate")
_ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_bf16", "amx_tile")


@dataclass
class Check:
    name: str
    status: str
    detail: str
    fix: str = ""


def _versions() -> list[Check]:
    import torch

    cuda = torch.version.cuda or "none (CPU-only torch build)"
    checks = [Check("torch", INFO, f"{torch.__version__}, CUDA runtime {cuda}, Python {platform.python_version()}")]
    if torch.cuda.is_available():
        checks.append(Check("CUDA driver", OK, f"{torch.cuda.device_count()} GPU(s) visible"))
    else:
        checks.append(Check("CUDA driver", INFO, "no GPU visible: the CPU kernels will be used"))
    return checks


def _build_info() -> tuple[dict | None, list[Check]]:
    from dinat_m2f._ext import ExtensionUnavailableError, build_info

    try:
        info = build_info()
    except ExtensionUnavailableError as e:
        return None, [Check("extension dinat_m2f._C", FAIL, str(e), "make build")]
    detail = f"built for torch {info['torch_version']}, backends {info['backends']}"
    return info, [Check("extension dinat_m2f._C", OK, detail + " (matches this torch)")]


def compiled_archs(cuda_archs: str) -> list[tuple[str, bool]]:
    """'8.0;9.0+PTX' -> [('8.0', False), ('9.0', True)] (arch, with PTX)."""
    archs = []
    for item in re.split(r"[;\s,]+", cuda_archs.strip()):
        if item:
            archs.append((item.replace("+PTX", ""), item.endswith("+PTX")))
    return archs


def gpu_arch_runs(gpu_arch: str, cuda_archs: str) -> bool:
    """A GPU runs the build if its arch was compiled, or a PTX arch at or below it was (JIT-compiled)."""
    major_minor = tuple(int(x) for x in gpu_arch.split("."))
    for arch, ptx in compiled_archs(cuda_archs):
        compiled = tuple(int(x) for x in re.findall(r"\d+", arch)[:2])
        if compiled == major_minor or (ptx and compiled <= major_minor):
            return True
    return False


def _gpus(info: dict | None) -> list[Check]:
    import torch

    checks = []
    if not torch.cuda.is_available():
        return checks
    built_cuda = info is not None and "cuda" in info["backends"]
    for i in range(torch.cuda.device_count()):
        name = torch.cuda.get_device_name(i)
        arch = "{}.{}".format(*torch.cuda.get_device_capability(i))
        if info is None:  # the extension failed to load: reported above
            checks.append(Check(f"GPU {i} {name} (sm {arch})", INFO, "the extension must load first"))
            continue
        if not built_cuda:
            checks.append(
                Check(
                    f"GPU {i} {name} (sm {arch})",
                    FAIL,
                    "the extension was built without its CUDA kernels: CUDA tensors would fail",
                    f"FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST={arch} make build",
                )
            )
        elif not gpu_arch_runs(arch, info.get("cuda_archs", "")):
            checks.append(
                Check(
                    f"GPU {i} {name} (sm {arch})",
                    FAIL,
                    f"compiled CUDA architectures are {info.get('cuda_archs')!r}, not this GPU's {arch}",
                    f'TORCH_CUDA_ARCH_LIST="{info.get("cuda_archs")};{arch}" make build',
                )
            )
        else:
            checks.append(Check(f"GPU {i} {name} (sm {arch})", OK, f"compiled archs {info.get('cuda_archs')!r}"))
    return checks


def cpu_isa() -> list[str]:
    """The instruction-set extensions of this CPU that matter for the kernels (from /proc/cpuinfo on Linux)."""
    flags = cpu_flags()
    return [f for f in _ISA_FLAGS if f in flags]


def _cpu(info: dict | None) -> list[Check]:
    march = re.search(r"-march=(\S+)", info["cxx_flags"]).group(1) if info and "-march=" in info["cxx_flags"] else "?"
    isa = cpu_isa()
    detail = f"{platform.machine()}, this CPU has {' '.join(isa) or 'no listed extensions'}; CPU kernels built with -march={march}"
    if march == "native":
        detail += " (for the CPU of the build machine: the op probe below shows whether they run here)"
    return [Check("CPU", INFO, detail)]


_PROBE = r"""
import json, sys, torch
from dinat_m2f.ops import na2d
from dinat_m2f.ops.ms_deform_attn import ms_deform_attn
from dinat_m2f.ops import reference
from dinat_m2f.ops.ms_deform_attn_reference import ms_deform_attn_reference
plan = json.loads(sys.argv[1])
out = {}
g = torch.Generator().manual_seed(0)
for device, dtypes in plan.items():
    for name in dtypes:
        dtype = getattr(torch, name)
        q, k, v = (torch.randn(1, 2, 9, 9, 8, generator=g) for _ in range(3))
        rpb = torch.randn(2, 5, 5, generator=g)
        value = torch.randn(1, 20, 2, 8, generator=g)
        shapes = torch.tensor([[4, 4], [2, 2]])
        start = torch.tensor([0, 16])
        loc = torch.rand(1, 5, 2, 2, 3, 2, generator=g)
        w = torch.rand(1, 5, 2, 2, 3, generator=g).softmax(-1)
        tol = 1e-4 if name in ("float32", "float64") else 5e-2
        wants = {"na2d": reference.na2d(q, k, v, 3, 2, rpb=rpb), "ms_deform_attn": ms_deform_attn_reference(value, shapes, loc, w)}
        for op, want in wants.items():
            try:
                if op == "na2d":
                    args = [t.to(device, dtype) for t in (q, k, v)]
                    got = na2d(*args, 3, 2, rpb=rpb.to(device, dtype))
                else:
                    got = ms_deform_attn(value.to(device, dtype), shapes.to(device), start.to(device),
                                         loc.to(device, dtype), w.to(device, dtype))
                err = (got.float().cpu() - want).abs().max().item()
                out[f"{op}|{device}|{name}"] = ["ok" if err <= tol else "wrong", f"max |error| vs reference {err:.1e}"]
            except Exception as e:
                out[f"{op}|{device}|{name}"] = ["error", f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"]
print("PROBE" + json.dumps(out))
"""


def probe_ops(devices: list[str], timeout: float = 300.0) -> tuple[dict[str, list[str]] | None, str]:
    """Run every op on every (device, dtype) in a child process; (results, '') or (None, why it died)."""
    plan = {d: PROBE_DTYPES[d] for d in devices}
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, json.dumps(plan)], capture_output=True, text=True, timeout=timeout
    )
    if proc.returncode < 0:
        sig = signal.Signals(-proc.returncode).name
        why = f"the op probe was killed by {sig}"
        if sig == "SIGILL":
            why += ": the CPU kernels use instructions this CPU does not have (built with another -march)"
        return None, why
    marker = [line for line in proc.stdout.splitlines() if line.startswith("PROBE")]
    if proc.returncode != 0 or not marker:
        return None, f"the op probe failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else '?'}"
    return json.loads(marker[-1][len("PROBE") :]), ""


def _backends(info: dict | None) -> list[Check]:
    import torch

    import dinat_m2f.ops as ops
    from dinat_m2f.ops.backends import resolve_backend

    checks = []
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        checks.append(Check(f"available_backends() for {device}", INFO, str(ops.available_backends(device))))
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            label = f"NA backend for {device} {str(dtype).removeprefix('torch.')}"
            try:  # the choice na2d (fused) and na2d_qk/na2d_av (unfused) make with no backend= argument
                fused = resolve_backend(None, "na2d", torch.device(device), dtype, fused=True)
                unfused = resolve_backend(None, "na2d_qk", torch.device(device), dtype, fused=False)
            except (RuntimeError, ValueError) as e:
                checks.append(Check(label, FAIL, str(e), "unset DINAT_M2F_NA_BACKEND or pick an available backend"))
                continue
            checks.append(Check(label, INFO, f"fused: {fused}, unfused: {unfused}"))
    if info is None:
        return checks
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() and "cuda" in info["backends"] else [])
    results, why = probe_ops(devices)
    if results is None:
        fix = "DINAT_M2F_CPU_ARCH=native make build (on this machine)" if "SIGILL" in why else "make build"
        return [*checks, Check("op probe", FAIL, why, fix)]
    for key, (status, detail) in sorted(results.items()):
        op, device, dtype = key.split("|")
        label = f"{op} on {device} {dtype}"
        if status == "ok":
            checks.append(Check(label, OK, f"native {device} kernel; {detail}"))
        elif status == "wrong":
            checks.append(Check(label, FAIL, f"native {device} kernel gives wrong results: {detail}", "make build"))
        elif dtype != "float32" and "support" in detail:  # the kernel's own "supports <dtypes>, got X" check
            checks.append(Check(label, INFO, f"not supported: {detail}"))
        else:  # float32 must always run; any other failure is a broken build, not a dtype limit
            checks.append(Check(label, FAIL, f"native {device} kernel fails: {detail}", "make build"))
    return checks


def _detectron2() -> list[Check]:
    try:
        import detectron2
        from detectron2 import _C
    except ImportError as e:
        return [Check("detectron2", FAIL, f"cannot import detectron2: {e}", "python tools/install_detectron2.py")]
    missing = []
    for name in _DETECTRON2_COMPILED_OPS:
        try:
            getattr(_C, name)
        except (AttributeError, RuntimeError):
            missing.append(name)
    detail = f"{detectron2.__version__}; "
    if missing:
        detail += f"compiled ops missing: {', '.join(missing)} (none is used by dinat_m2f)"
    else:
        detail += "compiled ops present"
    return [Check("detectron2", OK, detail)]


_PATH_KEYS = ("image_root", "json_file", "panoptic_root", "panoptic_json", "sem_seg_root", "gt_dir")


def dataset_status() -> tuple[list[str], list[str]]:
    """Registered dataset names whose files are all on disk, and those with a file missing (from their metadata)."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    present, absent = [], []
    for name in sorted(DatasetCatalog.list()):
        meta = MetadataCatalog.get(name)
        paths = [getattr(meta, key) for key in _PATH_KEYS if isinstance(getattr(meta, key, None), str)]
        if not paths:
            continue
        (present if all(os.path.exists(p) for p in paths) else absent).append(name)
    return present, absent


def _datasets() -> list[Check]:
    from dinat_m2f.data.datasets import current_root

    present, absent = dataset_status()
    root = current_root()
    checks = [Check("dataset root", INFO, f"{os.path.abspath(root)} (DETECTRON2_DATASETS)")]
    checks.append(
        Check("datasets on disk", INFO, ", ".join(present) if present else f"none of the {len(absent)} registered")
    )
    return checks


def run_checks() -> list[Check]:
    checks = _versions()
    info, ext = _build_info()
    checks += ext + _gpus(info) + _cpu(info) + _backends(info) + _detectron2() + _datasets()
    return checks


def format_report(checks: list[Check]) -> str:
    width = max(len(c.name) for c in checks)
    lines = []
    for c in checks:
        lines.append(f"[{c.status:>4}] {c.name:<{width}}  {c.detail}")
        if c.fix:
            lines.append(f"{'':>7} {'':<{width}}  fix: {c.fix}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dinat_m2f.doctor", description=__doc__.splitlines()[0])
    parser.parse_args(argv)
    checks = run_checks()
    print(format_report(checks))
    failed = [c for c in checks if c.status == FAIL]
    print(f"\n{len(failed)} problem(s) that would fail at run time." if failed else "\nno problem found.")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
