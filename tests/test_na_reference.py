"""The pure-PyTorch reference against brute-force loops written from NATTEN's own index formulas."""

import itertools

import pytest
import torch

from dinat_m2f.ops import reference


def natten_window_start(i: int, length: int, k: int, d: int) -> int:
    """get_window_start of NATTEN 0.17.5's CPU backend (dilation-group form), transcribed literally."""
    ns = k // 2
    if d <= 1:
        return max(i - ns, 0) + (i + ns >= length) * (length - i - ns - 1)
    r = i % d
    ii = i // d
    ceil_len = -(-length // d)
    group_len = ceil_len - (1 if r >= d - (ceil_len * d - length) else 0)
    s = max(ii - ns, 0) + (ii + ns >= group_len) * (group_len - ii - ns - 1)
    return s * d + r


def natten_pb_start(i: int, length: int, k: int, d: int) -> int:
    """get_pb_start of NATTEN 0.17.5."""
    ns = k // 2
    if d <= 1:
        return ns + (i < ns) * (ns - i) + (i + ns >= length) * (length - i - 1 - ns)
    if i - ns * d < 0:
        return k - 1 - i // d
    if i + ns * d >= length:
        return (length - i - 1) // d
    return ns


def brute_na2d_qk(q, k, ks, d, rpb):
    b, h, height, width, _ = q.shape
    out = torch.zeros(b, h, height, width, ks * ks, dtype=q.dtype)
    for i, j in itertools.product(range(height), range(width)):
        si, sj = natten_window_start(i, height, ks, d), natten_window_start(j, width, ks, d)
        pi, pj = natten_pb_start(i, height, ks, d), natten_pb_start(j, width, ks, d)
        for ki, kj in itertools.product(range(ks), range(ks)):
            val = (q[:, :, i, j] * k[:, :, si + ki * d, sj + kj * d]).sum(-1)
            if rpb is not None:
                val = val + rpb[:, pi + ki, pj + kj]
            out[:, :, i, j, ki * ks + kj] = val
    return out


def brute_na2d_av(attn, v, ks, d):
    b, h, height, width, dim = v.shape
    out = torch.zeros(b, h, height, width, dim, dtype=v.dtype)
    for i, j in itertools.product(range(height), range(width)):
        si, sj = natten_window_start(i, height, ks, d), natten_window_start(j, width, ks, d)
        for ki, kj in itertools.product(range(ks), range(ks)):
            out[:, :, i, j] += attn[:, :, i, j, ki * ks + kj, None] * v[:, :, si + ki * d, sj + kj * d]
    return out


@pytest.mark.parametrize(
    "length,k,d", [(3, 3, 1), (7, 3, 2), (11, 3, 3), (10, 5, 2), (13, 5, 2), (20, 7, 2), (9, 3, 3)]
)
def test_window_indices_match_natten_formula(length, k, d):
    idx = reference.window_indices(length, k, d)
    for i in range(length):
        start = natten_window_start(i, length, k, d)
        assert idx[i].tolist() == [start + t * d for t in range(k)]
        assert i in idx[i].tolist()  # every query sees itself


@pytest.mark.parametrize("shape,k,d", [((5, 7), 3, 1), ((7, 9), 3, 2), ((10, 11), 5, 2), ((9, 10), 3, 3)])
def test_na2d_reference_matches_brute_force(shape, k, d):
    torch.manual_seed(0)
    q, key, v = (torch.randn(2, 3, *shape, 4, dtype=torch.float64) for _ in range(3))
    rpb = torch.randn(3, 2 * k - 1, 2 * k - 1, dtype=torch.float64)
    attn = reference.na2d_qk(q, key, k, d, rpb)
    torch.testing.assert_close(attn, brute_na2d_qk(q, key, k, d, rpb))
    torch.testing.assert_close(reference.na2d_qk(q, key, k, d), brute_na2d_qk(q, key, k, d, None))
    torch.testing.assert_close(reference.na2d_av(attn, v, k, d), brute_na2d_av(attn, v, k, d))


@pytest.mark.parametrize("length,k,d", [(7, 3, 1), (11, 5, 2), (10, 3, 3)])
def test_na1d_reference_is_2d_with_one_row(length, k, d):
    torch.manual_seed(0)
    q, key, v = (torch.randn(2, 3, length, 4, dtype=torch.float64) for _ in range(3))
    rpb = torch.randn(3, 2 * k - 1, dtype=torch.float64)
    attn = reference.na1d_qk(q, key, k, d, rpb)
    for i in range(length):
        start, pb = natten_window_start(i, length, k, d), natten_pb_start(i, length, k, d)
        for t in range(k):
            want = (q[:, :, i] * key[:, :, start + t * d]).sum(-1) + rpb[:, pb + t]
            torch.testing.assert_close(attn[:, :, i, t], want)
    out = reference.na1d_av(attn, v, k, d)
    want = torch.stack(
        [
            sum(attn[:, :, i, t, None] * v[:, :, natten_window_start(i, length, k, d) + t * d] for t in range(k))
            for i in range(length)
        ],
        dim=2,
    )
    torch.testing.assert_close(out, want)


def test_fused_reference_is_softmax_of_scaled_logits_plus_bias():
    torch.manual_seed(0)
    q, key, v = (torch.randn(1, 2, 6, 7, 8, dtype=torch.float64) for _ in range(3))
    rpb = torch.randn(2, 5, 5, dtype=torch.float64)
    out = reference.na2d(q, key, v, 3, 2, rpb, scale=0.3)
    attn = (reference.na2d_qk(q, key, 3, 2) * 0.3 + reference.na2d_qk(torch.zeros_like(q), key, 3, 2, rpb)).softmax(-1)
    torch.testing.assert_close(out, reference.na2d_av(attn, v, 3, 2))
    # With a kernel covering the whole map (d=1), NA is plain attention.
    q, key, v = (torch.randn(1, 2, 5, 5, 8, dtype=torch.float64) for _ in range(3))
    dense = torch.nn.functional.scaled_dot_product_attention(q.flatten(2, 3), key.flatten(2, 3), v.flatten(2, 3))
    torch.testing.assert_close(reference.na2d(q, key, v, 5).flatten(2, 3), dense)
