"""Slot-decomposition pictures (paper figures 6, 9, 10): PNG grids and GIF animations.

Grid layout (one frame): columns ``input | masks overlaid | reconstruction | background |
slot 1 .. slot K``; rows ``RGB | depth (when available) | visible mask``. Slots that are absent
(``presence`` 0) are drawn dimmed so every frame of a GIF has the same size.
"""
from __future__ import annotations

import colorsys
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from locis_rl.atomic_files import write_atomically

__all__ = ["palette", "overlay_masks", "decomposition_grid", "save_png", "save_gif", "frame_from_output"]


def palette(n: int) -> np.ndarray:
    """``n`` well separated colours ``[n, 3]`` float in [0, 1] (golden-ratio hue steps)."""
    cols = [colorsys.hsv_to_rgb((0.07 + i * 0.618034) % 1.0, 0.75, 1.0) for i in range(n)]
    return np.asarray(cols, dtype=np.float32).reshape(n, 3)


def _np(x: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float32)


def overlay_masks(rgb: torch.Tensor, masks: torch.Tensor, alpha: float = 0.55) -> np.ndarray:
    """``rgb [3,H,W]`` with the argmax of ``masks [K+1,H,W]`` (background last) painted on top."""
    img = _np(rgb).transpose(1, 2, 0)
    m = _np(masks)
    k = m.shape[0] - 1
    label = m.argmax(0)
    colors = palette(max(k, 1))
    out = img.copy()
    fg = label < k
    if fg.any():
        out[fg] = (1 - alpha) * img[fg] + alpha * colors[label[fg]]
    # outline: pixels whose right/lower neighbour has another label
    edge = np.zeros_like(fg)
    edge[:, :-1] |= label[:, :-1] != label[:, 1:]
    edge[:-1, :] |= label[:-1, :] != label[1:, :]
    out[edge] = 1.0
    return out.clip(0, 1)


def _gray(x: np.ndarray) -> np.ndarray:
    x = x.squeeze()
    return np.repeat(x[..., None], 3, axis=-1).clip(0, 1)


def _rgb(x: np.ndarray) -> np.ndarray:
    return x.transpose(1, 2, 0).clip(0, 1)


def decomposition_grid(rgb: torch.Tensor, masks: torch.Tensor, slot_rgb: torch.Tensor,
                       background_rgb: torch.Tensor | None, recon_rgb: torch.Tensor | None = None,
                       depth: torch.Tensor | None = None, recon_depth: torch.Tensor | None = None,
                       slot_depth: torch.Tensor | None = None, background_depth: torch.Tensor | None = None,
                       presence: torch.Tensor | None = None, scale: int = 2) -> np.ndarray:
    """One frame's decomposition as a ``uint8 [rows*H', cols*W', 3]`` image.

    ``background_rgb`` may be ``None`` (models without a background slot, e.g. SAVi): a blank cell.

    Args:
        rgb ``[3,H,W]`` input; masks ``[K+1,H,W]`` visible masks (background last); slot_rgb
        ``[K,3,H,W]``; background_rgb ``[3,H,W]``; recon_rgb ``[3,H,W]``; depth ``[1,H,W]`` input
        depth in display units ([0, 1], e.g. scene-relative); recon_depth ``[1,H,W]``; slot_depth
        ``[K,1,H,W]``; background_depth ``[1,H,W]``; presence ``[K]``.
    """
    m = _np(masks)
    k = m.shape[0] - 1
    h, w = m.shape[-2:]
    colors = palette(max(k, 1))
    pres = np.ones(k, np.float32) if presence is None else _np(presence).reshape(k)
    blank = np.zeros((h, w, 3), np.float32)
    s_rgb = _np(slot_rgb)
    row_rgb = [_rgb(_np(rgb)), overlay_masks(rgb, masks),
               _rgb(_np(recon_rgb)) if recon_rgb is not None else blank,
               _rgb(_np(background_rgb)) if background_rgb is not None else blank]
    row_rgb += [_rgb(s_rgb[i]) * (1.0 if pres[i] > 0.5 else 0.3) for i in range(k)]
    rows = [row_rgb]
    has_depth = slot_depth is not None or depth is not None
    if has_depth:
        sd = _np(slot_depth) if slot_depth is not None else None
        row_d = [_gray(_np(depth)) if depth is not None else blank, blank,
                 _gray(_np(recon_depth)) if recon_depth is not None else blank,
                 _gray(_np(background_depth)) if background_depth is not None else blank]
        row_d += [(_gray(sd[i]) * (1.0 if pres[i] > 0.5 else 0.3)) if sd is not None else blank for i in range(k)]
        rows.append(row_d)
    row_m = [blank, blank, blank, _gray(m[k])]
    row_m += [_gray(m[i]) * colors[i] for i in range(k)]
    rows.append(row_m)
    sep = 1
    grid_h = len(rows) * (h + sep) - sep
    grid_w = len(rows[0]) * (w + sep) - sep
    out = np.ones((grid_h, grid_w, 3), np.float32)
    for r, row in enumerate(rows):
        for c, cell in enumerate(row):
            out[r * (h + sep): r * (h + sep) + h, c * (w + sep): c * (w + sep) + w] = cell
    img = (out * 255).round().astype(np.uint8)
    if scale > 1:
        img = img.repeat(scale, 0).repeat(scale, 1)
    return img


def frame_from_output(out, row: int, rgb: torch.Tensor, depth_display: torch.Tensor | None = None,
                      scale: int = 2) -> np.ndarray:
    """Grid for batch row ``row`` of a ``LociS.step`` output (TensorDict / dict)."""
    def get(key):
        try:
            v = out[key]
        except KeyError:
            return None
        return v[row]

    slot_depth = get("slot_depth_map")
    return decomposition_grid(rgb[row], get("masks"), get("slot_rgb"), get("background_rgb"),
                              recon_rgb=get("rgb"),
                              depth=None if depth_display is None else depth_display[row],
                              recon_depth=get("depth") if depth_display is not None else None,
                              slot_depth=slot_depth if depth_display is not None else None,
                              background_depth=get("background_depth") if depth_display is not None else None,
                              presence=get("presence"), scale=scale)


def save_png(image: np.ndarray, path: str | os.PathLike) -> Path:
    from PIL import Image

    return write_atomically(path, lambda tmp: Image.fromarray(image).save(tmp, format="PNG"))


def save_gif(frames: Sequence[np.ndarray], path: str | os.PathLike, frame_ms: int = 250) -> Path:
    from PIL import Image

    images = [Image.fromarray(f) for f in frames]
    return write_atomically(path, lambda tmp: images[0].save(tmp, format="GIF", save_all=True,
                                                           append_images=images[1:], duration=frame_ms, loop=0))
