import math

import pytest
import torch

from capsnet.model_export.capsules import DigitCaps, PrimaryCaps, route, route_without_votes, squash
from capsnet.model_export.config import CapsNetConfig

TINY = CapsNetConfig(conv1_channels=16, primary_types=4, primary_dim=8, num_classes=10, digit_dim=16)


def test_squash_norm_below_one_and_keeps_direction():
    s = torch.randn(50, 16, dtype=torch.float64) * torch.logspace(-3, 3, 50, dtype=torch.float64)[:, None]
    v = squash(s)
    norm_s, norm_v = s.norm(dim=-1), v.norm(dim=-1)
    assert torch.all(norm_v < 1)
    expected = norm_s**2 / (1 + norm_s**2)
    torch.testing.assert_close(norm_v, expected, rtol=1e-6, atol=1e-8)  # eps only matters near 0
    cos = torch.nn.functional.cosine_similarity(s, v, dim=-1)
    torch.testing.assert_close(cos, torch.ones_like(cos))


def test_squash_zero_is_zero_with_finite_gradient():
    s = torch.zeros(3, 8, requires_grad=True)
    v = squash(s)
    assert torch.equal(v, torch.zeros_like(v))
    v.sum().backward()
    assert s.grad is not None and torch.isfinite(s.grad).all()


def reference_routing(u_hat: torch.Tensor, r: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Procedure 1 of the paper, one capsule at a time. u_hat[b, j, i] = û_j|i."""
    B, J, N, D = u_hat.shape
    v = torch.zeros(B, J, D, dtype=u_hat.dtype)
    cs = []
    for bb in range(B):
        logits = [[0.0] * J for _ in range(N)]
        for _ in range(r):
            c = [[0.0] * J for _ in range(N)]
            for i in range(N):
                z = sum(math.exp(logits[i][k]) for k in range(J))
                for j in range(J):
                    c[i][j] = math.exp(logits[i][j]) / z
            if bb == 0:
                cs.append(torch.tensor(c, dtype=u_hat.dtype))
            for j in range(J):
                s = sum(c[i][j] * u_hat[bb, j, i] for i in range(N))
                n2 = float((s * s).sum())
                v[bb, j] = s * (n2 / (1 + n2)) / math.sqrt(n2)
            for i in range(N):
                for j in range(J):
                    logits[i][j] += float(u_hat[bb, j, i] @ v[bb, j])
    return v, cs


@pytest.mark.parametrize("r", [1, 2, 3])
def test_routing_matches_plain_loops(r):
    torch.manual_seed(r)
    u_hat = torch.randn(2, 4, 7, 5, dtype=torch.float64)
    v, coupling = route(u_hat, r)
    v_ref, c_ref = reference_routing(u_hat, r)
    assert coupling.shape == (2, r, 7, 4)
    torch.testing.assert_close(v, v_ref, atol=1e-6, rtol=0)
    for it in range(r):
        torch.testing.assert_close(coupling[0, it], c_ref[it], atol=1e-6, rtol=0)


def test_routing_changes_coupling_towards_agreement():
    # Two children agree with parent 0 only: after routing they couple to it more than uniformly.
    u_hat = torch.zeros(1, 2, 2, 3, dtype=torch.float64)
    u_hat[0, 0, :, 0] = 2.0  # both children vote the same vector for parent 0
    u_hat[0, 1, 0, 1] = 2.0  # and opposite vectors for parent 1
    u_hat[0, 1, 1, 1] = -2.0
    _, c = route(u_hat, 3)
    assert torch.allclose(c[0, 0], torch.full((2, 2), 0.5, dtype=torch.float64))
    assert torch.all(c[0, -1, :, 0] > 0.5)


def test_digitcaps_matches_reference_with_explicit_votes():
    torch.manual_seed(0)
    caps = DigitCaps(TINY).double()
    u = torch.randn(3, TINY.num_primary, TINY.primary_dim, dtype=torch.float64)
    v, _ = caps(u)
    u_hat = torch.einsum("ijdk,bik->bjid", caps.W, u)  # (B, J, N, D), the textbook form
    v_ref, _ = route(u_hat, TINY.routing_iterations)
    torch.testing.assert_close(v, v_ref)


@pytest.mark.parametrize("r", [1, 2, 3, 5])
def test_routing_without_votes_is_the_same_routing(r):
    """The exported formulation (from u and W, û never formed) against Procedure 1 on û, in float64:
    same parents and same coupling of every iteration, the first one (softmax(0) = 1/J) included."""
    torch.manual_seed(r)
    caps = DigitCaps(TINY).double()
    with torch.no_grad():
        caps.W.mul_(30.0)  # votes long enough that the coupling moves away from uniform
    u = squash(torch.randn(3, TINY.num_primary, TINY.primary_dim, dtype=torch.float64))
    u_hat = torch.einsum("ijdk,bik->bjid", caps.W, u)
    v_ref, c_ref = route(u_hat, r)
    v, c = route_without_votes(u.transpose(1, 2), caps.W.detach(), r)
    assert c.shape == c_ref.shape == (3, r, TINY.num_primary, TINY.num_classes)
    if r > 1:
        assert (c_ref[:, -1] - 1 / TINY.num_classes).abs().max() > 0.05  # routing did move c
    torch.testing.assert_close(c, c_ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(v, v_ref, rtol=0, atol=1e-12)


def test_components_first_is_the_same_capsules_transposed():
    torch.manual_seed(0)
    pc = PrimaryCaps(TINY)
    x = torch.randn(2, TINY.conv1_channels, TINY.conv1_out, TINY.conv1_out)
    with torch.no_grad():
        torch.testing.assert_close(pc.components_first(x), pc(x).transpose(1, 2))


def test_primary_caps_order_is_type_row_col():
    cfg = TINY
    pc = PrimaryCaps(cfg)
    x = torch.randn(2, cfg.conv1_channels, cfg.conv1_out, cfg.conv1_out)
    u = pc(x)
    G = cfg.primary_grid
    assert u.shape == (2, cfg.primary_types * G * G, cfg.primary_dim)
    raw = pc.conv(x)  # (B, types*dim, G, G); channel = type*dim + d
    t, row, col = 3, 4, 1
    i = t * G * G + row * G + col
    expected = squash(raw[:, t * cfg.primary_dim : (t + 1) * cfg.primary_dim, row, col])
    torch.testing.assert_close(u[:, i], expected)


@pytest.mark.parametrize(("size", "kernel", "stride"), [(20, 9, 2), (21, 9, 2), (11, 3, 3), (9, 4, 2)])
def test_conv2d_gradients_equal_autograds(size, kernel, stride):
    from capsnet.model_export.capsules import conv2d

    torch.manual_seed(size + kernel)
    conv = torch.nn.Conv2d(3, 5, kernel, stride=stride).double()
    x = torch.randn(4, 3, size, size, dtype=torch.float64, requires_grad=True)
    y = conv2d(conv, x)
    assert y.grad_fn is not None and "ConvGradsAsConvs" in type(y.grad_fn).__name__  # the custom backward ran
    expected = conv(x)
    torch.testing.assert_close(y, expected)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, conv.weight, conv.bias), g)
    ref = torch.autograd.grad(expected, (x, conv.weight, conv.bias), g)
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b)


def test_conv2d_is_the_plain_module_when_exporting_or_without_gradients(monkeypatch):
    from capsnet.model_export.capsules import _ConvGradsAsConvs, conv2d

    conv = torch.nn.Conv2d(2, 2, 3, stride=2)
    x = torch.randn(1, 2, 9, 9)
    with torch.no_grad():
        assert conv2d(conv, x).grad_fn is None

    class Wrapper(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = conv

        def forward(self, t: torch.Tensor) -> torch.Tensor:
            return conv2d(self.conv, t)

    def refuse(*args: object) -> torch.Tensor:
        raise AssertionError("the eager-training convolution was recorded")

    monkeypatch.setattr(_ConvGradsAsConvs, "apply", refuse)
    assert torch.is_grad_enabled()
    graph = str(torch.export.export(Wrapper(), (x,)).graph)  # gradients on, but exporting
    assert "aten.conv2d" in graph
