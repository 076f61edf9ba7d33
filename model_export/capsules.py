"""Capsule layers and routing by agreement, after Sabour, Frosst & Hinton, arXiv 1710.09829.

Primary capsules are numbered in (type, row, col) order: capsule i = type * G*G + row * G + col, where
G is the side of the grid (6 for MNIST), so a row of coupling coefficients reshapes to (types, G, G).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from model_export.config import CapsNetConfig

SQUASH_EPS = 1e-8


def exporting() -> bool:
    """True while either ONNX exporter records the model: the TorchScript tracer (`dynamo=False`)
    or torch.export (`dynamo=True`, under which `torch.jit.is_tracing()` is False)."""
    return bool(torch.jit.is_tracing() or torch.compiler.is_exporting())


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
    sums as autograd's. On 2 CPU cores at B = 128: the PrimaryCaps convolution (256 -> 256, 9x9,
    stride 2) forward + backward 1.98 -> 1.64 s, Conv1's weight gradient 187 -> 83 ms. Eager training
    only: export records the plain convolution.
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
            gw = torch.nn.functional.conv2d(
                x.transpose(0, 1), g.transpose(0, 1), dilation=s
            )  # (C_in, C_out, >=kh, >=kw)
            gw = gw[:, :, :kh, :kw].transpose(0, 1)  # (C_out, C_in, kh, kw)
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
        B = x.shape[0]
        y = conv2d(self.conv, x)  # (B, types*dim, G, G); channel = type*dim + d
        G = y.shape[-1]
        y = y.view(B, self.types, self.dim, G, G)  # (B, types, dim, G, G)
        y = y.permute(0, 1, 3, 4, 2)  # (B, types, G, G, dim)
        u = y.reshape(B, self.types * G * G, self.dim)  # (B, N, dim), N in (type, row, col) order
        return squash(u)


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
        """u (B, N, D_in) -> v (B, J, D_out), coupling (B, r, N, J)."""
        B, N, K = u.shape
        J, D = self.num_out, self.dim_out
        if not exporting():
            # Eager (training): einsum picks a batched GEMM whose forward + backward took 0.11 s per
            # batch of 128 against 0.38 s for the layout below (profiled on 2 CPU cores).
            return route(torch.einsum("bnk,njdk->bjnd", u, self.W).contiguous(), self.iterations)
        # Exported to ONNX: one batched matmul over the children i, (N, B, K) @ (N, K, J*D).
        votes = torch.bmm(u.transpose(0, 1), self.W.view(N, J * D, K).transpose(1, 2))  # (N, B, J*D)
        # Layout for routing in two moves of whole rows (160 then 16 floats): onnxruntime's generic
        # transpose of the single (3, 1, 0, 2) permutation took 60 % of inference time (profiled).
        votes = votes.transpose(0, 1).contiguous()  # (B, N, J*D)
        u_hat = votes.view(B, N, J, D).transpose(1, 2).contiguous()  # (B, J, N, D)
        return route(u_hat, self.iterations)
