"""Every size of the CapsNet in one place, with the defaults of arXiv 1710.09829."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any


@dataclass(frozen=True)
class CapsNetConfig:
    """Module sizes. Stored in every checkpoint so a model can be rebuilt from the checkpoint alone."""

    image_size: int = 28
    in_channels: int = 1
    conv1_channels: int = 256
    conv1_kernel: int = 9
    primary_types: int = 32  # capsule types in PrimaryCaps
    primary_dim: int = 8  # dimension of a primary capsule
    primary_kernel: int = 9
    primary_stride: int = 2
    num_classes: int = 10  # digit capsules
    digit_dim: int = 16  # dimension of a digit capsule (the pose)
    routing_iterations: int = 3  # r
    decoder_hidden: tuple[int, int] = (512, 1024)

    def __post_init__(self) -> None:
        if self.routing_iterations < 1:
            raise ValueError("routing_iterations must be >= 1")
        if self.primary_grid < 1:
            raise ValueError("the convolutions leave no primary-capsule grid for this image size")

    @property
    def conv1_out(self) -> int:
        """Side of the Conv1 feature map (20 for MNIST)."""
        return self.image_size - self.conv1_kernel + 1

    @property
    def primary_grid(self) -> int:
        """Side of each capsule type's grid (6 for MNIST)."""
        return (self.conv1_out - self.primary_kernel) // self.primary_stride + 1

    @property
    def num_primary(self) -> int:
        """Number of primary capsules, ordered (type, row, col): 32 * 6 * 6 = 1152."""
        return self.primary_types * self.primary_grid**2

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["decoder_hidden"] = list(self.decoder_hidden)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CapsNetConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown config keys: {sorted(unknown)}")
        d = dict(d)
        if "decoder_hidden" in d:
            d["decoder_hidden"] = tuple(d["decoder_hidden"])
        return cls(**d)
