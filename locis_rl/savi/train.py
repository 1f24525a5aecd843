"""Training the SAVi baseline with ``python -m locis_rl.pretrain`` (``model_family: savi``).

SAVi has one training stage, the phase ``savi``: whole-model video training on the same episodes
as Loci-s (:class:`~locis_rl.pretrain.data.EpisodeStore`), with the same machinery (optimiser,
checkpoints, resume, TensorBoard, ``model.pt``, ``metrics.json``). Per training sequence:

* ``SAVi.init_state`` (seeded per optimiser step), then per frame ``SAVi.step`` + ``SAVi.loss``
  (reconstruction of the frame, plus depth with ``model.predict_depth``);
* truncated BPTT over windows of ``stages.savi.bptt`` frames, as Loci-s's ``full`` stage
  (``SAVi.detach_state`` between windows, one optimiser update per window);
* ``boxes`` / ``centers`` models get the first frame's ground-truth boxes / centres of mass
  (:func:`~locis_rl.savi.boxes_from_segmentation` of its segmentation; of the median-foreground
  pseudo-instances for files recorded without segmentation).

:class:`SAViStage` has the interface of the stages in :mod:`locis_rl.pretrain.stages`
(``sample``, ``freeze_others``, ``forward`` returning ``(loss, logs, state)`` per window as
``FullStage``), so the run loop treats it like ``full``.

Usage::

    python -m locis_rl.pretrain --preset savi-quickstart          # CPU, minutes
    python -m locis_rl.pretrain --preset savi-gpu-budget          # the gpu-budget data and wall-clock
    python -m locis_rl.pretrain --model savi model.conditioning=boxes stages.savi.steps=500
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from locis_rl.pretrain.config import TrainConfig
from locis_rl.pretrain.data import Batch
from locis_rl.pretrain.stages import StageModule

__all__ = ["PHASE", "phases_for", "SAViStage", "savi_window", "gt_conditioning", "decomposition_frames",
           "is_savi_model"]

PHASE = "savi"
"""Name of SAVi's only phase (and ``--stage`` value)."""


def phases_for(stage: str) -> list[str]:
    """Phases of a ``--stage`` value for ``model_family: savi`` (``all`` or ``savi``)."""
    if stage in ("all", PHASE):
        return [PHASE]
    from locis_rl.model.config import ConfigError

    raise ConfigError(f"stage {stage!r} is a Loci-s stage; model_family=savi trains one stage: "
                     f"--stage savi (or all)")


def is_savi_model(model: Any) -> bool:
    """Whether ``model`` is a SAVi (duck-typed: its config has a ``conditioning`` string)."""
    return isinstance(getattr(getattr(model, "config", None), "conditioning", None), str)


def gt_conditioning(model: Any, segmentation: torch.Tensor | None) -> dict[str, torch.Tensor] | None:
    """``conditioning`` for ``SAVi.step`` on a row's first frame: ground-truth boxes / centres.

    Args:
        segmentation: ``[B, H, W]`` integer instance ids of the first frame (0 = background).

    Returns:
        ``None`` for unconditional models, else ``{"boxes", "centers", "valid"}`` on the
        segmentation's device.

    Raises:
        ValueError: a conditional model and no segmentation.
    """
    cfg = model.config
    if not cfg.conditional:
        return None
    if segmentation is None:
        raise ValueError(f"SAVi with conditioning={cfg.conditioning!r} needs first-frame ground-truth "
                         f"{cfg.conditioning} (from a segmentation): the data has no segmentation")
    from locis_rl.savi.model import boxes_from_segmentation

    boxes, centers, valid = boxes_from_segmentation(segmentation.long(), cfg.num_slots)
    return {"boxes": boxes, "centers": centers, "valid": valid}


def savi_window(model: Any, batch: Batch, state, t0: int, t1: int, depth_weight: float = 1.0):
    """``SAVi.step`` + ``SAVi.loss`` over frames ``t0 .. t1-1`` of ``batch`` (one BPTT window).

    Frame 0 of the batch starts the rows (``state`` fresh); conditional models get its
    ground-truth boxes / centres. Returns ``(loss, logs, state)`` (loss averaged over the window;
    the state is *not* detached).
    """
    b = batch.rgb.shape[0]
    if state is None:
        state = model.init_state(b, batch.rgb.device)
    use_depth = model.config.use_depth
    losses = []
    logs: dict[str, torch.Tensor] = {}
    n = t1 - t0
    for t in range(t0, t1):
        rgb = batch.rgb[:, t]
        depth = None if batch.depth is None else batch.depth[:, t]
        kwargs: dict[str, Any] = {}
        if t == 0 and model.config.conditional:
            seg = batch.segmentation if batch.segmentation is not None else batch.instances
            kwargs["conditioning"] = gt_conditioning(model, seg[:, 0])
        out, state = model.step(rgb, depth if use_depth else None, state, **kwargs)
        res = model.loss(out, rgb, depth, depth_weight=depth_weight)
        losses.append(res["total"].float())
        for key in ("rgb", "depth"):
            logs[f"loss/savi_{key}"] = logs.get(f"loss/savi_{key}", 0.0) + res[key].detach().float() / n
        with torch.no_grad():
            logs["charts/slots_present"] = (logs.get("charts/slots_present", 0.0)
                                            + out["presence"].float().sum(1).mean() / n)
    total = torch.stack(losses).mean()
    logs["loss/savi_total"] = total.detach()
    return total, logs, state


class SAViStage(StageModule):
    """SAVi video training: the whole model, truncated BPTT windows (the run loop's ``full`` path).

    ``forward(batch, state=..., t0=..., t1=...)`` returns ``(loss, logs, state)`` of one window;
    the caller backpropagates and detaches the state (``SAVi.detach_state``) before the next.
    """

    phase = PHASE

    def __init__(self, model: torch.nn.Module, cfg: TrainConfig) -> None:
        super().__init__(model, cfg)

    @property
    def bptt(self) -> int:
        return self.cfg.stages.savi.bptt

    def trained_modules(self):
        return [self.model]

    def sample(self, store, items, generator: torch.Generator) -> Batch:
        """A window of ``stages.savi.seq_len`` frames per episode, at a random start."""
        length = min(self.cfg.stages.savi.seq_len, store.frames)
        start = torch.randint(0, store.frames - length + 1, (len(items),), generator=generator)
        return store.batch(items, start, length)

    def compute(self, batch: Batch, state=None, t0: int = 0, t1: int | None = None, **_: Any):
        return savi_window(self.model, batch, state, t0, batch.rgb.shape[1] if t1 is None else t1,
                           self.cfg.stages.savi.depth_weight)


@torch.no_grad()
def decomposition_frames(model: Any, episode: dict[str, torch.Tensor], device: torch.device, *,
                         seed: int = 0, frames: int = 3) -> list[np.ndarray]:
    """Slot-decomposition grids (:func:`locis_rl.pretrain.visualize.frame_from_output`) of the
    first ``frames`` frames of one episode (``EpisodeStore.episode`` layout)."""
    from locis_rl.model.depth_input import scene_relative_depth
    from locis_rl.pretrain.visualize import frame_from_output

    rgb = episode["rgb"].to(device)
    depth = episode.get("depth")
    depth = depth.to(device) if depth is not None else None
    seg = episode.get("segmentation", episode.get("instances"))
    state = model.init_state(1, device, seed=seed)
    out_frames = []
    for t in range(min(frames, rgb.shape[0])):
        d_t = depth[t:t + 1] if depth is not None else None
        kwargs: dict[str, Any] = {}
        if t == 0 and model.config.conditional:
            kwargs["conditioning"] = gt_conditioning(model, None if seg is None else seg[0:1].to(device))
        out, state = model.step(rgb[t:t + 1], d_t if model.config.use_depth else None, state, **kwargs)
        disp = scene_relative_depth(d_t) if d_t is not None else None
        out_frames.append(frame_from_output(out, 0, rgb[t:t + 1], disp))
    return out_frames
