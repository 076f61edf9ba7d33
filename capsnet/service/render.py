"""Pictures of the model's real outputs (numpy + Pillow): routing heatmaps."""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

# viridis anchors: dark purple (low) -> yellow (high); perceptually ordered, readable in grey too
_ANCHORS = np.array([(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)], np.float32)


def colormap(x01: np.ndarray) -> np.ndarray:
    """Values in [0, 1] -> uint8 RGB, piecewise linear through the viridis anchors."""
    x = np.clip(x01, 0.0, 1.0) * (len(_ANCHORS) - 1)
    i = np.minimum(x.astype(int), len(_ANCHORS) - 2)
    t = (x - i)[..., None]
    out: np.ndarray = np.rint(_ANCHORS[i] * (1 - t) + _ANCHORS[i + 1] * t).astype(np.uint8)
    return out


@dataclass(frozen=True)
class HeatmapLayout:
    """Where each primary capsule's cell lands: iterations side by side, capsule types in rows of
    `per_row` tiles, each tile the capsule type's G x G grid."""

    iterations: int
    types: int
    grid: int
    cell: int = 8
    gap: int = 3
    per_row: int = 8
    margin: int = 10
    header: int = 30
    footer: int = 44

    @property
    def tile(self) -> int:
        return self.grid * self.cell

    @property
    def panel_w(self) -> int:
        return self.per_row * (self.tile + self.gap) - self.gap

    @property
    def panel_h(self) -> int:
        rows = -(-self.types // self.per_row)
        return rows * (self.tile + self.gap) - self.gap

    @property
    def size(self) -> tuple[int, int]:
        w = self.margin * 2 + self.iterations * (self.panel_w + self.margin * 2) - self.margin * 2
        return w, self.header + self.panel_h + self.footer

    def cell_origin(self, it: int, t: int, row: int, col: int) -> tuple[int, int]:
        """(x, y) of the top-left pixel of capsule (type t, row, col) in iteration `it` (0-based)."""
        x0 = self.margin + it * (self.panel_w + self.margin * 2)
        tx, ty = t % self.per_row, t // self.per_row
        return (x0 + tx * (self.tile + self.gap) + col * self.cell,
                self.header + ty * (self.tile + self.gap) + row * self.cell)  # fmt: skip


def routing_heatmap(
    values: np.ndarray, grid: int, titles: list[str], legend: str
) -> tuple[bytes, HeatmapLayout]:
    """values (r, types*G*G) in (type, row, col) order -> PNG of r panels on one colour scale."""
    r, n = values.shape
    types = n // (grid * grid)
    lay = HeatmapLayout(r, types, grid)
    lo, hi = float(values.min()), float(values.max())
    scaled = (values - lo) / (hi - lo) if hi > lo else np.zeros_like(values)
    rgb = colormap(scaled.reshape(r, types, grid, grid))
    img = np.full((lay.size[1], lay.size[0], 3), 255, np.uint8)
    for it in range(r):
        for t in range(types):
            x, y = lay.cell_origin(it, t, 0, 0)
            tile = np.kron(rgb[it, t], np.ones((lay.cell, lay.cell, 1), np.uint8))
            img[y : y + lay.tile, x : x + lay.tile] = tile
    pic = Image.fromarray(img)
    draw = ImageDraw.Draw(pic)
    for it, title in enumerate(titles):
        x, _ = lay.cell_origin(it, 0, 0, 0)
        draw.text((x, 8), title, fill=(0, 0, 0))
    y = lay.header + lay.panel_h + 8
    bar = colormap(np.linspace(0, 1, 200))[None].repeat(12, axis=0)
    pic.paste(Image.fromarray(bar), (lay.margin, y))
    draw.text((lay.margin, y + 16), f"{lo:.5f}", fill=(0, 0, 0))
    draw.text((lay.margin + 160, y + 16), f"{hi:.5f}", fill=(0, 0, 0))
    draw.text((lay.margin + 215, y), legend, fill=(0, 0, 0))
    buf = io.BytesIO()
    pic.save(buf, format="PNG")
    return buf.getvalue(), lay
