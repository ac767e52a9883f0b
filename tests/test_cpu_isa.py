"""Run-time choice of the CPU kernels' instruction set (native/na/na_cpu_dispatch.cpp).

Both ISA paths must agree with each other (the NA op tests cover each path's exactness: `make test` runs
tests/test_na_ops.py a second time with DINAT_M2F_CPU_ISA=avx2), the override must be honoured and loud when wrong,
and no AVX-512 instruction may sit in a function the baseline path can reach (the linker-merge SIGILL hazard).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import dinat_m2f
from dinat_m2f.ops.na import na2d, na2d_av, na2d_qk

ISA_ENV = "DINAT_M2F_CPU_ISA"


def _supported() -> list[str]:
    return list(dinat_m2f.build_info()["cpu_isas_supported"])


def test_build_info_names_the_isa_path(monkeypatch):
    monkeypatch.delenv(ISA_ENV, raising=False)
    info = dinat_m2f.build_info()
    assert "avx2" in info["cpu_isas_supported"]
    assert info["cpu_isa"] == info["cpu_isas_supported"][-1]  # the best one by default
    monkeypatch.setenv(ISA_ENV, "avx2")
    assert dinat_m2f.build_info()["cpu_isa"] == "avx2"


def test_bad_isa_value_is_a_clear_error(monkeypatch):
    monkeypatch.setenv(ISA_ENV, "sse2")
    q = torch.randn(1, 1, 7, 7, 8)
    with pytest.raises(RuntimeError, match="DINAT_M2F_CPU_ISA='sse2' is not an instruction set.*avx2, avx512 or auto"):
        na2d_qk(q, q, 3, 1)


def test_avx512_request_without_avx512_is_a_clear_error(monkeypatch):
    if "avx512" in _supported():
        pytest.skip("this CPU has AVX-512")
    monkeypatch.setenv(ISA_ENV, "avx512")
    q = torch.randn(1, 1, 7, 7, 8)
    with pytest.raises(RuntimeError, match="DINAT_M2F_CPU_ISA=avx512 but this CPU lacks AVX-512"):
        na2d_qk(q, q, 3, 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("size", "kernel", "dilation"), [((21, 40), 7, 1), ((24, 33), 5, 3), ((9, 70), 3, 2)])
def test_isa_paths_agree(monkeypatch, size, kernel, dilation, dtype):
    if "avx512" not in _supported():
        pytest.skip("this CPU has only the baseline path")
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, *size, 32, generator=g).to(dtype).requires_grad_() for _ in range(3))
    rpb = torch.randn(3, 2 * kernel - 1, 2 * kernel - 1, generator=g).to(dtype).requires_grad_()
    go = torch.randn(2, 3, *size, 32, generator=g).to(dtype)

    def run(isa: str) -> list[torch.Tensor]:
        monkeypatch.setenv(ISA_ENV, isa)
        assert dinat_m2f.build_info()["cpu_isa"] == isa
        fused = na2d(q, k, v, kernel, dilation, rpb=rpb)
        grads = torch.autograd.grad(fused, (q, k, v, rpb), go)
        attn = na2d_qk(q, k, kernel, dilation, rpb=rpb).softmax(-1)
        return [fused, *grads, attn, na2d_av(attn, v, kernel, dilation)]

    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for a, b in zip(run("avx2"), run("avx512")):
        torch.testing.assert_close(a.float(), b.float(), **tol)


def _evex_functions(so: Path) -> set[str]:
    """Demangled names of the functions of `so` that contain AVX-512 instructions.

    In 64-bit mode the byte 0x62 as an instruction's first opcode byte is always the EVEX prefix (AVX-512), and the
    AVX-512 mask registers %k0-%k7 are used only by AVX-512 code (kmov and friends are VEX-encoded).
    """
    dump = subprocess.run(
        ["objdump", "-d", "-C", "--no-addresses", str(so)], capture_output=True, text=True, check=True
    ).stdout
    found, current = set(), None
    header = re.compile(r"^<(.*)>:$")
    for line in dump.splitlines():
        if m := header.match(line):
            current = m.group(1)
            continue
        parts = line.split("\t")
        if current is None or len(parts) < 2:
            continue
        code = parts[0].split()
        evex = bool(code) and (code[0] == "62" or code[:2] == ["67", "62"])
        if evex or re.search(r"%k[0-7]\b", parts[-1]):
            found.add(current)
    return found


def test_avx512_code_only_in_the_avx512_namespace():
    info = dinat_m2f.build_info()
    if "-march=x86-64-v3" not in info["cxx_flags"]:
        pytest.skip(f"built with another baseline ({info['cxx_flags']}); the check assumes -march=x86-64-v3")
    if shutil.which("objdump") is None:
        pytest.skip("objdump (binutils) is not installed")
    so = Path(dinat_m2f._C.__file__)
    evex = _evex_functions(so)
    assert any("::avx512::" in name for name in evex), "no AVX-512 kernel found: is the AVX-512 variant compiled?"
    leaked = sorted(name for name in evex if "::avx512::" not in name)
    assert not leaked, f"AVX-512 instructions outside dinat_m2f::na::cpu::avx512 in {so.name}: {leaked[:10]}"
