"""The CapsNet of arXiv 1710.09829: Conv1 -> PrimaryCaps -> DigitCaps, a decoder and the loss."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from capsnet.model_export.capsules import DigitCaps, PrimaryCaps, conv2d, route_without_votes
from capsnet.model_export.config import CapsNetConfig


class Decoder(nn.Module):
    """Reconstructs the image from the pose of one class (the others masked to zero)."""

    def __init__(self, cfg: CapsNetConfig) -> None:
        super().__init__()
        h1, h2 = cfg.decoder_hidden
        self.image_size = cfg.image_size
        self.layers = nn.Sequential(
            nn.Linear(cfg.num_classes * cfg.digit_dim, h1),
            nn.ReLU(inplace=True),
            nn.Linear(h1, h2),
            nn.ReLU(inplace=True),
            nn.Linear(h2, cfg.in_channels * cfg.image_size**2),
            nn.Sigmoid(),
        )

    def forward(self, poses: Tensor, mask: Tensor) -> Tensor:
        """poses (B, J, D), mask (B, J) (one-hot, or any weights) -> (B, C, H, W) in [0, 1]."""
        B = poses.shape[0]
        masked = (poses * mask.unsqueeze(-1)).flatten(1)  # (B, J*D)
        return self.layers(masked).view(B, -1, self.image_size, self.image_size)


class CapsNetOutput(NamedTuple):
    lengths: Tensor  # (B, J) capsule lengths = class probabilities
    poses: Tensor  # (B, J, D) digit capsules v_j
    coupling: Tensor  # (B, r, N, J) c_ij of every routing iteration
    primary_activations: Tensor  # (B, N) lengths of the primary capsules u_i


class CapsNet(nn.Module):
    def __init__(self, cfg: CapsNetConfig | None = None) -> None:
        super().__init__()
        self.config = cfg = cfg or CapsNetConfig()
        self.conv1 = nn.Conv2d(cfg.in_channels, cfg.conv1_channels, kernel_size=cfg.conv1_kernel)
        self.primary = PrimaryCaps(cfg)
        self.digits = DigitCaps(cfg)
        self.decoder = Decoder(cfg)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x (B, 1, 28, 28) in [0, 1] -> lengths (B, J), poses v (B, J, D), coupling (B, r, N, J)."""
        out = self.run(x)
        return out.lengths, out.poses, out.coupling

    def run(self, x: Tensor) -> CapsNetOutput:
        """Everything the service shows, the primary capsules' activations included. Training and the
        exported graph route alike, without forming the votes (`route_without_votes`, tested equal to
        `route` on û): its backward pass too streams W and c * u instead of û, 20 times u."""
        h = F.relu(conv2d(self.conv1, x))  # (B, 256, 20, 20)
        u = self.primary.components_first(h)  # (B, 8, N): components first, the layout routing reads
        v, coupling = route_without_votes(u, self.digits.W, self.digits.iterations)  # (B, J, D), (B, r, N, J)
        activations = torch.linalg.vector_norm(u, dim=1)  # (B, N)
        lengths = torch.linalg.vector_norm(v, dim=-1)  # (B, J): probability that class j is present
        return CapsNetOutput(lengths, v, coupling, activations)

    def reconstruct(self, poses: Tensor, classes: Tensor) -> Tensor:
        """Decoder fed with the poses masked to `classes` (B,) -> (B, C, H, W)."""
        mask = F.one_hot(classes, self.config.num_classes).to(poses.dtype)
        return self.decoder(poses, mask)


def margin_loss(
    lengths: Tensor, targets: Tensor, m_pos: float = 0.9, m_neg: float = 0.1, lam: float = 0.5
) -> Tensor:
    """Eq. 4: summed over the classes, averaged over the batch."""
    T = F.one_hot(targets, lengths.shape[1]).to(lengths.dtype)
    present = T * F.relu(m_pos - lengths) ** 2
    absent = lam * (1.0 - T) * F.relu(lengths - m_neg) ** 2
    return (present + absent).sum(dim=1).mean()


def reconstruction_loss(recon: Tensor, images: Tensor) -> Tensor:
    """Sum of squared errors over the pixels, averaged over the batch."""
    return ((recon - images) ** 2).flatten(1).sum(dim=1).mean()


def capsnet_loss(
    model: CapsNet, images: Tensor, targets: Tensor, recon_weight: float = 0.0005
) -> tuple[Tensor, Tensor]:
    """Margin loss + 0.0005 x reconstruction loss, the decoder masked to the true class.

    Returns the total loss and the lengths (for accuracy bookkeeping).
    """
    lengths, poses, _ = model(images)
    recon = model.reconstruct(poses, targets)
    loss = margin_loss(lengths, targets) + recon_weight * reconstruction_loss(recon, images)
    return loss, lengths
