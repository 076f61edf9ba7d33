"""Capsule layers and routing by agreement, after Sabour, Frosst & Hinton, arXiv 1710.09829.

Primary capsules are numbered in (type, row, col) order: capsule i = type * G*G + row * G + col, where
G is the side of the grid (6 for MNIST), so a row of coupling coefficients reshapes to (types, G, G).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from capsnet.model_export.config import CapsNetConfig

SQUASH_EPS = 1e-8


def exporting() -> bool:
    """True while torch.export records the model (`torch.onnx.export(..., dynamo=True)`)."""
    return bool(torch.compiler.is_exporting())


def squash(s: Tensor, dim: int = -1) -> Tensor:
    """Shrink s to a length in [0, 1) keeping its direction: |s|^2 / (1 + |s|^2) * s / |s|.

    The eps sits inside the square root so that a zero vector maps to zero with a finite gradient.
    """
    sq = (s * s).sum(dim=dim, keepdim=True)
    return s * (sq / ((1.0 + sq) * torch.sqrt(sq + SQUASH_EPS)))


class _ConvGradsAsConvs(torch.autograd.Function):
    """An unpadded convolution whose backward pass is two more convolutions, not oneDNN's backward
    kernels, which are slow for these shapes on the CPU.

    The input gradient is a transposed convolution and the weight gradient a convolution of the input
    with the output gradient (dilated by the stride), the batch as the contracted channel: the same
    sums as autograd's, and faster on the CPU for both of CapsNet's convolutions. Eager training only:
    export records the plain convolution.
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx, x: Tensor, w: Tensor, b: Tensor, stride: int
    ) -> Tensor:
        ctx.save_for_backward(x, w)
        ctx.stride = stride  # type: ignore[attr-defined]
        return torch.nn.functional.conv2d(x, w, b, stride=stride)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, g: Tensor) -> tuple[Tensor | None, ...]:
        x, w = ctx.saved_tensors  # type: ignore[attr-defined]
        s = ctx.stride  # type: ignore[attr-defined]
        kh, kw = w.shape[-2:]
        gx = gw = None
        if ctx.needs_input_grad[0]:  # type: ignore[attr-defined]
            pad = ((x.shape[-2] - kh) % s, (x.shape[-1] - kw) % s)  # rows/cols the stride skipped
            gx = torch.nn.functional.conv_transpose2d(g, w, stride=s, output_padding=pad)  # (B, C_in, H, W)
        if ctx.needs_input_grad[1]:  # type: ignore[attr-defined]
            # The batch as the contracted channel: (C_in, B, H, W) with (C_out, B, H', W') dilated.
            # Only the rows and columns the forward pass read: those the stride skipped at the far
            # edge would add whole rows of weight gradient to throw away (PrimaryCaps: 10x10 for
            # 9x9, 23 % more work).
            h, w_ = kh + s * (g.shape[-2] - 1), kw + s * (g.shape[-1] - 1)
            gw = torch.nn.functional.conv2d(
                x[:, :, :h, :w_].transpose(0, 1), g.transpose(0, 1), dilation=s
            )  # (C_in, C_out, kh, kw)
            gw = gw.transpose(0, 1)  # (C_out, C_in, kh, kw)
        return gx, gw, g.sum(dim=(0, 2, 3)), None


def conv2d(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """`conv(x)`, through _ConvGradsAsConvs when gradients are wanted in eager mode on the CPU."""
    plain = conv.padding == (0, 0) and conv.dilation == (1, 1) and conv.groups == 1 and conv.bias is not None
    square = conv.stride[0] == conv.stride[1]
    on_cpu = x.device.type == "cpu"  # measured there; cuDNN's own backward is left alone
    if plain and square and on_cpu and torch.is_grad_enabled() and not exporting():
        return _ConvGradsAsConvs.apply(x, conv.weight, conv.bias, conv.stride[0])  # type: ignore[no-any-return]
    return conv(x)  # type: ignore[no-any-return]


class PrimaryCaps(nn.Module):
    """A convolution whose output channels are read as `types` capsules of `dim` components each."""

    def __init__(self, cfg: CapsNetConfig) -> None:
        super().__init__()
        self.types, self.dim = cfg.primary_types, cfg.primary_dim
        self.conv = nn.Conv2d(
            cfg.conv1_channels,
            cfg.primary_types * cfg.primary_dim,
            kernel_size=cfg.primary_kernel,
            stride=cfg.primary_stride,
        )

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) feature map -> (B, N, dim) squashed capsules in (type, row, col) order."""
        y = conv2d(self.conv, x)  # (B, types*dim, G, G); channel = type*dim + d
        B, G = y.shape[0], y.shape[-1]
        y = y.view(B, self.types, self.dim, G, G)  # (B, types, dim, G, G)
        y = y.permute(0, 1, 3, 4, 2)  # (B, types, G, G, dim)
        u = y.reshape(B, self.types * G * G, self.dim)  # (B, N, dim), N in (type, row, col) order
        return squash(u)

    def components_first(self, x: Tensor) -> Tensor:
        """The same capsules as `forward`, laid out (B, dim, N): the layout the model routes in, where
        the convolution's channels need one move of whole rows (G*G floats) and routing reads every
        component across the N children contiguously."""
        y = conv2d(self.conv, x)  # (B, types*dim, G, G)
        B, G = y.shape[0], y.shape[-1]
        y = y.view(B, self.types, self.dim, G * G).transpose(1, 2)  # (B, dim, types, G*G)
        return squash(y.reshape(B, self.dim, self.types * G * G), dim=1)  # (B, dim, N)


def route(u_hat: Tensor, iterations: int) -> tuple[Tensor, Tensor]:
    """Routing by agreement (Procedure 1 of the paper).

    u_hat: (B, J, N, D) prediction vectors, u_hat[b, j, i] = û_j|i (children i vote for parents j).
    Returns v (B, J, D), the parent capsules, and c (B, r, N, J), the coupling of every iteration.
    `iterations` is a Python int, so tracing unrolls the loop into r copies.
    """
    B, J, N, _ = u_hat.shape
    b = u_hat.new_zeros(B, N, J)  # routing logits b_ij
    couplings = []
    v = u_hat.new_zeros(B, J, u_hat.shape[-1])
    for it in range(iterations):
        c = torch.softmax(b, dim=2)  # (B, N, J): c_i = softmax over the parents j of b_i
        couplings.append(c)
        s = torch.matmul(c.transpose(1, 2).unsqueeze(2), u_hat).squeeze(2)  # (B, J, D): Σ_i c_ij û_j|i
        v = squash(s)  # (B, J, D)
        if it + 1 < iterations:  # the last update of b would change nothing that is returned
            agreement = torch.matmul(u_hat, v.unsqueeze(-1)).squeeze(-1)  # (B, J, N): û_j|i · v_j
            b = b + agreement.transpose(1, 2)  # (B, N, J)
    return v, torch.stack(couplings, dim=1)  # (B, J, D), (B, r, N, J)


class DigitCaps(nn.Module):
    """One 8x16 transformation matrix W_ij per (child i, parent j), then routing by agreement."""

    def __init__(self, cfg: CapsNetConfig) -> None:
        super().__init__()
        self.iterations = cfg.routing_iterations
        self.num_out, self.dim_out = cfg.num_classes, cfg.digit_dim
        # W[i, j] maps an 8-D child to a 16-D vote: (N, J, D_out, D_in)
        self.W = nn.Parameter(
            0.01 * torch.randn(cfg.num_primary, cfg.num_classes, cfg.digit_dim, cfg.primary_dim)
        )

    def forward(self, u: Tensor) -> tuple[Tensor, Tensor]:
        """u (B, N, D_in) -> v (B, J, D_out), coupling (B, r, N, J): the textbook form, votes and all.

        The reference the model's routing is tested against: `CapsNet.run` routes without the votes
        (`route_without_votes`), in training as in the exported graph."""
        return route(torch.einsum("bnk,njdk->bjnd", u, self.W).contiguous(), self.iterations)


def softmax_first(b: Tensor) -> Tensor:
    """Softmax over dim 0, written out: onnxruntime's Softmax over a leading axis moves the whole
    tensor around it, which costs several times these five operators."""
    e = torch.exp(b - b.amax(dim=0, keepdim=True))
    return e / e.sum(dim=0, keepdim=True)


def route_without_votes(u: Tensor, W: Tensor, iterations: int) -> tuple[Tensor, Tensor]:
    """Routing by agreement from the children u and the matrices W, never forming the votes û: what
    the exported graph computes. Same algorithm as `route`, regrouped:

    - s_j = Σ_i c_ij W_ij u_i = Σ_(k,i) (c_ij u_ik) W_ij[:, k]: per parent, one product over the
      K*N (component, child) pairs;
    - û_j|i · v_j = u_i · (W_ij^T v_j): a product with W^T, then a sum over the K components;
    - the first iteration's c is softmax(0) = 1/J everywhere, so its s is one plain matrix product.

    u: (B, K, N) components first (`PrimaryCaps.components_first`); W: (N, J, D, K). Returns v (B, J, D)
    and c (B, r, N, J) like `route`. û is B x N x J x D floats, 20 times u: built once and read by every
    routing product, it makes the routing memory-bound; each product here streams c * u or W^T v (half
    û's size) or W itself, so it is the faster form from a few images up. A single image pays for
    reading W five times where û would be read once; docs/performance.md has the measurements.
    """
    B, K, N = u.shape
    _, J, D, _ = W.shape
    w_mean = W.permute(3, 0, 1, 2).reshape(K * N, J * D)  # [(k, i), (j, d)]
    w_sum = W.permute(1, 3, 0, 2).reshape(J, K * N, D)  # [j, (k, i), d]
    w_back = W.permute(1, 2, 3, 0).reshape(J, D, K * N)  # [j, d, (k, i)]
    b: Tensor | None = None  # routing logits b_ij, laid out (J, B, N)
    couplings = []
    for it in range(iterations):
        if b is None:
            couplings.append(u.new_full((B, N, J), 1.0 / J))
            s = torch.matmul(u.reshape(B, K * N), w_mean).view(B, J, D) * (1.0 / J)
        else:
            c = softmax_first(b)  # (J, B, N): c_i = softmax over the parents j of b_i
            couplings.append(c.permute(1, 2, 0))
            s = torch.matmul((c.unsqueeze(2) * u).reshape(J, B, K * N), w_sum).transpose(0, 1)
        v = squash(s)  # (B, J, D)
        if it + 1 < iterations:  # the last update of b would change nothing that is returned
            back = torch.matmul(v.transpose(0, 1), w_back).view(J, B, K, N)  # W_ij^T v_j
            agreement = (back * u).sum(dim=2)  # (J, B, N): û_j|i · v_j
            b = agreement if b is None else b + agreement
    return v, torch.stack(couplings, dim=1)  # (B, J, D), (B, r, N, J)
