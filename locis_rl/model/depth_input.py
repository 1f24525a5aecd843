"""Scene-relative depth normalisation (paper appendix B, eq. 5).

Raw metric depth spans very different ranges across scenes (a table top vs. a room), so Loci-s
feeds the encoder a per-image *relative* depth: the log depth is standardised by its own mean and
std and squashed by a (reversed) logistic, so near pixels map close to 1 and far pixels close to 0.
"""
from __future__ import annotations

import torch

__all__ = ["scene_relative_depth"]

# Floor of the per-image log-depth std: a flat scene (all valid pixels at one depth) would
# otherwise divide 0 by 0; with the floor such pixels all map to exactly 0.5.
_MIN_LOG_STD = 1e-4


def scene_relative_depth(depth: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Map raw metric depth to scene-relative depth in ``(0, 1)``, per image.

    ``d = 1 / (1 + exp((ln(depth) - mu) / sigma))`` with ``mu`` / ``sigma`` the mean / population
    std of ``ln(depth)`` over the image's valid pixels. Fully vectorised over the batch.

    Args:
        depth: ``[N, 1, H, W]`` raw depth (any real dtype; integers are converted to float32).
        valid: optional ``[N, 1, H, W]`` bool mask of pixels to use. Pixels that are not finite or
            not ``> 0`` are always invalid, whatever ``valid`` says.

    Returns:
        ``[N, 1, H, W]`` scene-relative depth, same float dtype / device as ``depth``: near -> close
        to 1, far -> close to 0, invalid pixels exactly 0. An image without any valid pixel is all 0.
    """
    if not depth.is_floating_point():
        depth = depth.float()
    ok = torch.isfinite(depth) & (depth > 0)
    if valid is not None:
        ok = ok & valid.to(torch.bool)
    # Replace invalid pixels by 1 before the log (log 1 = 0), so no NaN/inf ever enters the sums
    # (a NaN would poison the gradient even when masked out afterwards).
    log_depth = torch.log(torch.where(ok, depth, torch.ones_like(depth)))
    weight = ok.to(depth.dtype)
    dims = tuple(range(1, depth.dim()))
    count = weight.sum(dim=dims, keepdim=True).clamp_min(1.0)
    mu = (log_depth * weight).sum(dim=dims, keepdim=True) / count
    centred = (log_depth - mu) * weight
    # Clamp the variance before the sqrt: sqrt'(0) = inf would give NaN gradients for flat images.
    sigma = (centred.pow(2).sum(dim=dims, keepdim=True) / count).clamp_min(_MIN_LOG_STD ** 2).sqrt()
    # 1 / (1 + exp(z)) == sigmoid(-z), the numerically safe form for large |z|.
    relative = torch.sigmoid(-centred / sigma)
    return relative * weight
