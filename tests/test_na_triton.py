"""The Triton neighborhood-attention kernels (backend="triton") against the pure-PyTorch reference.

Runs natively on a CUDA device, and on the CPU under the Triton interpreter: TRITON_INTERPRET=1 must be set before
triton is imported, so CI runs this file in its own pytest process (`make test-triton`, part of `make test`):

    TRITON_INTERPRET=1 python -m pytest tests/test_na_triton.py

Without a CUDA device and without the interpreter, those tests are skipped with that instruction; what runs then
is the ahead-of-time compilation of every kernel for Hopper (sm_90), which needs no GPU and catches what the
interpreter does not check (types, constexpr rules, register/shared-memory limits at ptxas). Problems are
tiny (the interpreter runs each program in numpy) but cover odd and non-square maps, sides that are not multiples
of the tile (8x8 in 2D, 64 in 1D) or of the dilation, every border, batch and heads > 1 and head_dim not a power of
two. Gradients of q, k, v and rpb are compared with autograd through the reference in float64.
"""

from __future__ import annotations

import os

import pytest
import torch

from dinat_m2f import ops
from dinat_m2f.ops import reference as ref

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEVICE = "cpu" if INTERPRET else "cuda"
needs_a_runner = pytest.mark.skipif(
    not INTERPRET and not torch.cuda.is_available(),
    reason="needs a CUDA device or the Triton interpreter: TRITON_INTERPRET=1 python -m pytest tests/test_na_triton.py",
)

# (kernel_size, dilation, (H, W)) and (kernel_size, dilation, L).
CASES_2D = [
    (3, 1, (7, 9)),
    (3, 3, (10, 9)),  # sides not divisible by the dilation
    (5, 2, (11, 10)),
    (7, 1, (7, 7)),  # smallest legal map: every window is the whole map
    (3, 1, (19, 10)),  # several 8x8 tiles, the last ones partial
    (9, 1, (9, 10)),
    (11, 1, (12, 11)),
    (13, 1, (13, 14)),
]
CASES_1D = [(3, 1, 7), (5, 2, 23), (7, 3, 40), (9, 2, 19), (11, 1, 30), (13, 1, 70)]
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.float16: dict(rtol=2e-2, atol=2e-2)}
LOW_PRECISION = [
    torch.float16,
    pytest.param(
        torch.bfloat16,
        marks=pytest.mark.skipif(
            INTERPRET, reason="the Triton 3.8 interpreter computes bfloat16 tl.dot wrongly (tested on CUDA only)"
        ),
    ),
]


def _problem(shape, kernel_size, dims, dtype, head_dim=16, batch=2, heads=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, heads, *shape, head_dim, generator=g, dtype=torch.float64) for _ in range(3))
    rpb = torch.randn(heads, *(2 * kernel_size - 1,) * dims, generator=g, dtype=torch.float64)
    return [t.to(device=DEVICE, dtype=dtype).requires_grad_() for t in (q, k, v, rpb)]


def _check_against_reference(dims, shape, kernel_size, dilation, dtype, head_dim=16, with_rpb=True):
    q, k, v, rpb = _problem(shape, kernel_size, dims, dtype, head_dim)
    rpb = rpb if with_rpb else None
    op, ref_op = (ops.na2d, ref.na2d) if dims == 2 else (ops.na1d, ref.na1d)
    out = op(q, k, v, kernel_size, dilation, rpb, backend="triton")
    grad_out = torch.randn_like(out)
    inputs = [t for t in (q, k, v, rpb) if t is not None]
    grads = torch.autograd.grad(out, inputs, grad_out)

    exact = [t.detach().double().requires_grad_() for t in inputs]
    ref_rpb = exact[3] if with_rpb else None
    expected = ref_op(exact[0], exact[1], exact[2], kernel_size, dilation, ref_rpb)
    expected_grads = torch.autograd.grad(expected, exact, grad_out.double())

    assert out.dtype == dtype and out.shape == q.shape
    tol = TOL.get(dtype, dict(rtol=3e-2, atol=3e-2))
    torch.testing.assert_close(out.double(), expected, **tol)
    for name, got, want in zip(["q", "k", "v", "rpb"], grads, expected_grads):
        assert got.dtype == dtype, name
        torch.testing.assert_close(got.double(), want, **tol, msg=lambda m, name=name: f"grad {name}: {m}")


@needs_a_runner
@pytest.mark.parametrize("case", CASES_2D, ids=lambda c: f"k{c[0]}-d{c[1]}-{c[2]}")
def test_na2d_float32(case):
    kernel_size, dilation, shape = case
    _check_against_reference(2, shape, kernel_size, dilation, torch.float32)


@needs_a_runner
@pytest.mark.parametrize("case", CASES_1D, ids=lambda c: f"k{c[0]}-d{c[1]}-L{c[2]}")
def test_na1d_float32(case):
    kernel_size, dilation, length = case
    _check_against_reference(1, (length,), kernel_size, dilation, torch.float32)


@needs_a_runner
@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_na2d_low_precision(dtype):
    _check_against_reference(2, (9, 13), 3, 3, dtype, head_dim=24)


@needs_a_runner
@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_na1d_low_precision(dtype):
    _check_against_reference(1, (40,), 13, 1, dtype)


@needs_a_runner
def test_without_bias_and_odd_head_dim():
    _check_against_reference(2, (8, 11), 5, 1, torch.float32, head_dim=20, with_rpb=False)


@needs_a_runner
def test_head_dim_128():
    _check_against_reference(1, (12,), 5, 2, torch.float32, head_dim=128)


@needs_a_runner
def test_backward_is_deterministic():
    q, k, v, rpb = _problem((11, 10), 5, 2, torch.float32)

    def grads():
        out = ops.na2d(q, k, v, 5, 2, rpb, backend="triton")
        return torch.autograd.grad(out, (q, k, v, rpb), torch.ones_like(out))

    for first, second in zip(grads(), grads()):
        assert torch.equal(first, second)


@needs_a_runner
def test_explicit_scale_and_environment_choice(monkeypatch):
    q, k, v, rpb = _problem((7, 9), 3, 2, torch.float32)
    expected = ref.na2d(q, k, v, 3, 1, rpb, scale=0.3)
    torch.testing.assert_close(
        ops.na2d(q, k, v, 3, 1, rpb, scale=0.3, backend="triton"), expected, **TOL[torch.float32]
    )
    monkeypatch.setenv("DINAT_M2F_NA_BACKEND", "triton")
    # Chosen by the environment: float64 is not a Triton dtype, so the error proves the Triton path was taken.
    with pytest.raises(TypeError, match="use backend='native' for float64"):
        ops.na2d(q.double(), k.double(), v.double(), 3)
    assert "triton" in ops.available_backends(DEVICE)


@needs_a_runner
def test_input_errors():
    q, k, v, rpb = _problem((7, 9), 3, 2, torch.float32)
    with pytest.raises(ValueError, match=r"axis 0 of q has size 7, smaller than kernel_size \* dilation = 5 \* 2"):
        ops.na2d(q, k, v, 5, 2, backend="triton")
    with pytest.raises(ValueError, match=r"rpb must have shape \(3, 5, 5\)"):
        ops.na2d(q, k, v, 3, 1, rpb[:, :3], backend="triton")
    with pytest.raises(ValueError, match="na2d_qk has no 'triton' implementation"):
        ops.na2d_qk(q, k, 3, backend="triton")


class _Attention(torch.nn.Module):
    def __init__(self, rpb: torch.Tensor) -> None:
        super().__init__()
        self.rpb = torch.nn.Parameter(rpb.detach().clone())

    def forward(self, q, k, v):
        return ops.na2d(q, k, v, 3, 2, self.rpb, backend="triton") * 2


@needs_a_runner
def test_torch_compile_fullgraph():
    q, k, v, rpb = _problem((7, 9), 3, 2, torch.float32)
    module = _Attention(rpb)
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    out = compiled(q, k, v)
    out.sum().backward()
    eager = _Attention(rpb)
    expected = eager(q.detach(), k.detach(), v.detach())
    expected.sum().backward()
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(module.rpb.grad, eager.rpb.grad)


@needs_a_runner
def test_opcheck():
    from dinat_m2f.ops import na_triton

    q, k, v, rpb = _problem((7, 7), 3, 2, torch.float32, batch=1, heads=1)
    forward = na_triton._FORWARD_OPS[2]
    torch.library.opcheck(forward, (q, k, v, rpb, 3, 1, 0.25), test_utils=("test_schema", "test_faketensor"))


@needs_a_runner
def test_flop_count_sees_the_triton_op():
    from dinat_m2f.utils.flops import dinat_flop_count_analysis

    class Attention(torch.nn.Module):
        def forward(self, q, k, v):
            return ops.na2d(q, k, v, 3, 1, backend="triton")

    q, k, v, _ = (t.detach() for t in _problem((7, 9), 3, 2, torch.float32, batch=1, heads=2))
    counted = dinat_flop_count_analysis(Attention(), (q, k, v))
    assert counted.by_operator() == {"na2d_triton_forward": 1 * 2 * 7 * 9 * 2 * 16 * 3 * 3}  # QK + AV, no bias
    assert not counted.unsupported_ops()


# ----------------------------------------------------------------------------------------------- compilation
HOPPER_SHARED_MEMORY = 227 * 1024  # bytes a block may use on sm_90
POINTERS = {"Q", "K", "V", "RPB", "OUT", "DO", "DQ", "DK", "DV"}  # of the input dtype; the others are float32


def _signature(kernel, dtype: str, constexprs: dict) -> dict:
    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in POINTERS:
            signature[name] = f"*{dtype}"
        elif name in {"LSE", "DELTA", "DS"}:
            signature[name] = "*fp32"
        else:
            signature[name] = "fp32" if name == "scale" else "i32"
    return signature


@pytest.mark.skipif(
    INTERPRET or torch.cuda.is_available(),
    reason="the interpreter replaces the compiler (this test runs in the normal pytest run); on a GPU the tests above "
    "compile the kernels for it",
)
@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
def test_kernels_compile_for_hopper(dtype):
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from dinat_m2f.ops import na_triton

    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    launch = na_triton.launch_options(torch_dtype)
    common = dict(KH=11, KW=11, TH=8, TW=8, BLOCK_N=64, BLOCK_D=128, HAS_RPB=True)  # head_dim 128: the largest tiles
    common["PRECISION"] = "ieee" if dtype == "fp32" else "tf32"
    for kernel, extra in (
        (na_triton._na_forward_kernel, {}),
        (na_triton._na_backward_query_kernel, {"STORE_DS": True}),
        (na_triton._na_backward_key_kernel, {}),
    ):
        constexprs = {**common, **extra}
        source = ASTSource(fn=kernel, signature=_signature(kernel, dtype, constexprs), constexprs=constexprs)
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=launch)
        assert compiled.metadata.shared <= HOPPER_SHARED_MEMORY, (kernel.__name__, compiled.metadata.shared)
        if dtype != "fp32":  # the products run on Hopper's tensor cores (warpgroup MMA)
            assert "wgmma.mma_async" in compiled.asm["ptx"], kernel.__name__
