"""dinat_m2f.modeling.linear: the CPU float32 product-then-bias form against F.linear."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dinat_m2f.modeling import linear as linear_module
from dinat_m2f.modeling.linear import Linear, adds_bias_after_product, linear


@pytest.fixture
def bias_after_product(monkeypatch):
    """The product-then-bias form whatever this CPU is (it is taken on Intel CPUs with MKL only)."""
    monkeypatch.setattr(linear_module, "bias_after_product_pays_off", lambda: True)


def _inputs(shape, out_features=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g)
    w = torch.randn(out_features, shape[-1], generator=g) / shape[-1] ** 0.5
    b = torch.randn(out_features, generator=g)
    return x, w, b


@pytest.mark.parametrize("shape", [(7, 40), (2, 9, 40), (2, 5, 6, 40)])
def test_linear_matches_f_linear_values_and_gradients(shape, bias_after_product):
    x, w, b = _inputs(shape)
    assert adds_bias_after_product(x, w)
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    expected_leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    out = linear(*leaves)
    expected = F.linear(*expected_leaves)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad)
    for got, want in zip(leaves, expected_leaves):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-5, atol=1e-5)


def test_linear_reads_strided_inputs(bias_after_product):
    x, w, b = _inputs((2, 9, 40))
    assert adds_bias_after_product(x, w)
    view = x.transpose(1, 2).contiguous().transpose(1, 2)  # [2, 9, 40], not contiguous
    assert not view.is_contiguous()
    torch.testing.assert_close(linear(view, w, b), F.linear(view, w, b), rtol=1e-5, atol=1e-5)


def test_linear_is_f_linear_without_bias_under_autocast_and_outside_float32(bias_after_product):
    x, w, b = _inputs((2, 9, 40))
    assert torch.equal(linear(x, w), F.linear(x, w))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not adds_bias_after_product(x, w)
        assert torch.equal(linear(x, w, b), F.linear(x, w, b))
    x64, w64, b64 = x.double(), w.double(), b.double()
    assert not adds_bias_after_product(x64, w64)
    assert torch.equal(linear(x64, w64, b64), F.linear(x64, w64, b64))


@pytest.mark.parametrize(
    "vendor, mkl, expected",
    [("GenuineIntel", True, True), ("AuthenticAMD", True, False), ("", True, False), ("GenuineIntel", False, False)],
)
def test_bias_after_product_only_on_intel_cpus_with_mkl(monkeypatch, vendor, mkl, expected):
    monkeypatch.setattr(linear_module, "cpu_vendor", lambda: vendor)
    monkeypatch.setattr(torch.backends.mkl, "is_available", lambda: mkl)
    linear_module.bias_after_product_pays_off.cache_clear()
    try:
        assert linear_module.bias_after_product_pays_off() is expected
        x, w, b = _inputs((2, 9, 40))
        assert adds_bias_after_product(x, w) is expected
        torch.testing.assert_close(linear(x, w, b), F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    finally:
        linear_module.bias_after_product_pays_off.cache_clear()


def test_traced_linear_keeps_the_standard_op():
    layer = Linear(40, 24)
    graph = torch.jit.trace(layer, torch.randn(3, 40)).inlined_graph
    kinds = {node.kind() for node in graph.nodes()}
    assert "aten::linear" in kinds and "aten::matmul" not in kinds


def test_exported_linear_keeps_the_standard_op():
    program = torch.export.export(Linear(40, 24), (torch.randn(3, 40),))
    targets = {node.target for node in program.graph.nodes if node.op == "call_function"}
    assert targets == {torch.ops.aten.linear.default}


def test_linear_module_has_nn_linear_parameters():
    reference = nn.Linear(40, 24)
    layer = Linear(40, 24)
    layer.load_state_dict(reference.state_dict())
    assert list(layer.state_dict()) == ["weight", "bias"]
    x = torch.randn(4, 40)
    torch.testing.assert_close(layer(x), reference(x), rtol=1e-5, atol=1e-5)
    assert isinstance(layer, nn.Linear)
