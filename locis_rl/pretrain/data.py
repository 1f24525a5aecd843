"""Training data: locate or generate the video files, split them, and sample batches.

* :func:`resolve_data_paths` returns the files given with ``--data`` (checked) or generates the
  preset's dataset from ``data.env_id`` into the cache directory once (rank 0 only, atomically by
  the generator's own tmp + ``os.replace``) and reuses it afterwards.
* :class:`EpisodeStore` reads whole episodes with :class:`locis_rl.data.VideoDataset`, splits them
  into training and held-out episodes per file, and keeps decoded episodes in memory as uint8.
* Foreground and instance targets: ``segmentation != 0`` and the segmentation ids when the files
  store segmentation; otherwise the temporal-median foreground
  (:func:`locis_rl.model.background.median_background_foreground`) and its connected components
  (:func:`connected_components`) as pseudo-instances.
* Batches are drawn through :class:`torch.utils.data.DistributedSampler` (one replica without
  torchrun): the indices of optimiser step ``s`` depend only on (seed, stage, s), so a resumed run
  sees exactly the batches the uninterrupted run would have seen.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import DistributedSampler

from locis_rl.pretrain.config import TrainConfig

__all__ = ["DataError", "cache_dir", "resolve_data_paths", "EpisodeStore", "connected_components",
           "StepSampler"]


class DataError(FileNotFoundError):
    """A missing or unusable data file (message says which and how to create one)."""


def cache_dir(cfg: TrainConfig) -> Path:
    if cfg.data.cache_dir:
        return Path(cfg.data.cache_dir).expanduser()
    root = os.environ.get("LOCIS_RL_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "locis-rl"
    return base / "data"


def _cache_name(env_id: str, level: str | None, episodes: int, frames: int, size: int, seed: int) -> str:
    env = re.sub(r"[^A-Za-z0-9]+", "-", env_id).strip("-").lower()
    lv = f"_{level}" if level else ""
    return f"{env}{lv}_ep{episodes}_f{frames}_{size}px_seed{seed}.h5"


def _check_file(path: str) -> None:
    from locis_rl.data import DatasetError, describe

    if not os.path.exists(path):
        raise DataError(f"data file {path!r} does not exist; create one with "
                        f"`python -m locis_rl.data.generate --env locis/MultiObject-v0 --out {path}` "
                        f"or leave out --data to generate the preset's dataset")
    try:
        describe(path)
    except DatasetError as e:
        raise DataError(str(e)) from e


def resolve_data_paths(cfg: TrainConfig, *, is_main: bool = True, barrier: Callable[[], None] | None = None,
                       log: Callable[[str], None] = print) -> list[str]:
    """Files to train on: ``cfg.data.paths`` (each checked) or the preset's cached recording.

    With several processes only the main one generates; ``barrier`` makes the others wait.
    """
    if cfg.data.paths:
        paths = [os.path.abspath(os.path.expanduser(p)) for p in cfg.data.paths]
        for p in paths:
            _check_file(p)
        return paths
    root = cache_dir(cfg)
    levels: Sequence[str | None] = cfg.data.levels or (None,)
    paths = []
    for level in levels:
        name = _cache_name(cfg.data.env_id, level, cfg.data.episodes, cfg.data.frames,
                           cfg.model.image_size, cfg.data.seed)
        path = root / name
        paths.append(str(path))
        if is_main and not path.exists():
            from locis_rl.data.generate import generate

            log(f"generating {cfg.data.episodes} episodes x {cfg.data.frames} frames of {cfg.data.env_id}"
                f"{' level ' + level if level else ''} -> {path}")
            generate(cfg.data.env_id, cfg.data.episodes, cfg.data.frames, path,
                     env_kwargs={"level": level} if level else None, seed=cfg.data.seed,
                     workers=cfg.data.workers, image_size=cfg.model.image_size, progress=cfg.progress)
        elif is_main:
            log(f"using cached dataset {path}")
    if barrier is not None:
        barrier()
    for p in paths:
        _check_file(p)
    return paths


@torch.no_grad()
def connected_components(mask: torch.Tensor, max_iterations: int | None = None) -> torch.Tensor:
    """4-connected components of binary masks, vectorised (label propagation by max-pooling).

    Args:
        mask: ``[..., H, W]`` bool.

    Returns:
        ``int64`` labels of the same shape: 0 outside the mask, components numbered ``1..n`` per
        image (ordered by their last pixel in raster order).
    """
    shape = mask.shape
    h, w = shape[-2:]
    m = mask.reshape(-1, 1, h, w).bool()
    n = m.shape[0]
    idx = torch.arange(1, h * w + 1, device=m.device, dtype=torch.float32).view(1, 1, h, w).expand(n, -1, -1, -1)
    labels = torch.where(m, idx, torch.zeros_like(idx))
    cross = torch.tensor([[0, 1, 0], [1, 1, 1], [0, 1, 0]], dtype=torch.bool, device=m.device)
    limit = max_iterations or (h * w)
    for _ in range(limit):
        padded = F.pad(labels, (1, 1, 1, 1))
        patches = F.unfold(padded, 3).view(n, 9, h, w)
        new = patches[:, cross.flatten()].amax(1, keepdim=True)
        new = torch.where(m, new, torch.zeros_like(new))
        if torch.equal(new, labels):
            break
        labels = new
    # renumber 1..n per image: the label is the max pixel index of the component
    flat = labels.view(n, -1).long()
    for_sort = flat + (torch.arange(n, device=m.device) * (h * w + 1)).unsqueeze(1)
    uniq, inv = torch.unique(for_sort, return_inverse=True)
    row = torch.div(uniq, h * w + 1, rounding_mode="floor")
    is_bg = (uniq - row * (h * w + 1)) == 0
    # rank of each unique label within its row (unique is sorted, rows contiguous)
    counts = torch.bincount(row, minlength=n)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(uniq.numel(), device=m.device) - starts[row]
    has_bg = torch.zeros(n, dtype=torch.long, device=m.device).index_add_(0, row, is_bg.long())
    rank = rank + 1 - has_bg[row]
    first = torch.where(is_bg, torch.zeros_like(rank), rank)
    out = first[inv].view(n, -1)
    return out.view(shape)


@dataclass
class Batch:
    rgb: torch.Tensor
    """``[B, T, 3, H, W]`` float in [0, 1]."""
    depth: torch.Tensor | None
    """``[B, T, 1, H, W]`` raw metric depth or None."""
    segmentation: torch.Tensor | None
    """``[B, T, H, W]`` int64 (GT ids) or None."""
    foreground: torch.Tensor
    """``[B, T, 1, H, W]`` float target (GT ``segmentation != 0`` or temporal median)."""
    instances: torch.Tensor
    """``[B, T, H, W]`` int64 instance ids (GT or median-foreground connected components)."""

    def to(self, device: torch.device) -> "Batch":
        def mv(t):
            return None if t is None else t.to(device, non_blocking=True)

        return Batch(mv(self.rgb), mv(self.depth), mv(self.segmentation), mv(self.foreground), mv(self.instances))


class EpisodeStore:
    """Whole episodes of one or more files with a per-file held-out split."""

    def __init__(self, paths: Sequence[str], cfg: TrainConfig):
        from locis_rl.data import DatasetError, VideoDataset, describe

        self.paths = list(paths)
        infos = []
        for p in self.paths:
            try:
                infos.append(describe(p))
            except DatasetError as e:
                raise DataError(str(e)) from e
        self.frames = min(int(a["frames"]) for a in infos)
        self.dataset = VideoDataset(self.paths, seq_len=self.frames, stride=self.frames,
                                    image_size=cfg.model.image_size)
        self.has_segmentation = "segmentation" in self.dataset.keys
        self.has_depth = "depth" in self.dataset.keys
        self.median_threshold = cfg.stages.background.median_threshold
        # item order of VideoDataset: file, episode, window start (one window per episode here,
        # except files with longer episodes, which give several)
        train, held_out = [], []
        item = 0
        for a in infos:
            n, t = int(a["episodes"]), int(a["frames"])
            windows = len(range(0, t - self.frames + 1, self.frames))
            n_eval = 0 if n < 2 else max(1, int(round(cfg.data.eval_fraction * n)))
            for e in range(n):
                ids = list(range(item, item + windows))
                (held_out if e >= n - n_eval else train).extend(ids)
                item += windows
        if item != len(self.dataset):  # layout changed under us: fall back to a plain split
            ids = list(range(len(self.dataset)))
            k = max(1, int(round(cfg.data.eval_fraction * len(ids)))) if len(ids) > 1 else 0
            train, held_out = ids[: len(ids) - k], ids[len(ids) - k:]
        self.train_ids, self.eval_ids = train, held_out or list(train)
        self.preload = cfg.data.preload
        self._cache: dict[int, dict[str, torch.Tensor]] = {}

    # ---- items ----------------------------------------------------------------------------
    def episode(self, item: int) -> dict[str, torch.Tensor]:
        """Decoded episode ``item`` (float rgb, raw depth, int64 segmentation, fg, instances)."""
        cached = self._cache.get(item)
        if cached is None:
            raw = self.dataset[item]
            rgb = raw["rgb"]
            if self.has_segmentation:
                seg = raw["segmentation"]
                fg = (seg != 0).unsqueeze(1)
                inst = seg
            else:
                fg = median_foreground(rgb, self.median_threshold) > 0.5
                inst = connected_components(fg[:, 0])
            cached = {"rgb": (rgb * 255).round().to(torch.uint8), "fg": fg, "instances": inst.to(torch.int16)}
            if self.has_depth:
                cached["depth"] = raw["depth"]
            if self.has_segmentation:
                cached["segmentation"] = raw["segmentation"].to(torch.int16)
            if self.preload:
                self._cache[item] = cached
        out = {"rgb": cached["rgb"].float().div(255.0), "foreground": cached["fg"].float(),
               "instances": cached["instances"].long()}
        if "depth" in cached:
            out["depth"] = cached["depth"]
        if "segmentation" in cached:
            out["segmentation"] = cached["segmentation"].long()
        return out

    def batch(self, items: Sequence[int], frame_index: torch.Tensor | None = None, length: int = 1) -> Batch:
        """Episodes ``items``; per row a window of ``length`` frames starting at ``frame_index``."""
        eps = [self.episode(int(i)) for i in items]
        if frame_index is None:
            frame_index = torch.zeros(len(eps), dtype=torch.long)

        def stack(key):
            if key not in eps[0]:
                return None
            return torch.stack([e[key][int(s): int(s) + length] for e, s in zip(eps, frame_index)])

        return Batch(stack("rgb"), stack("depth"), stack("segmentation"), stack("foreground"), stack("instances"))


def median_foreground(rgb: torch.Tensor, threshold: float) -> torch.Tensor:
    """Temporal-median foreground target ``[T,1,H,W]`` for an episode without masks."""
    from locis_rl.model.background import median_background_foreground

    return median_background_foreground(rgb, threshold=threshold)


class StepSampler:
    """Indices of the batch of optimiser step ``s`` through a :class:`DistributedSampler`.

    Epoch ``e = s // batches_per_epoch``; the sampler is re-shuffled with ``set_epoch(e)`` and the
    ``s % batches_per_epoch``-th chunk of ``batch_size`` indices is the batch. Stateless, so resuming
    at step ``s`` gives the same batches as the uninterrupted run.
    """

    def __init__(self, ids: Sequence[int], batch_size: int, *, seed: int, rank: int = 0, world_size: int = 1):
        self.ids = list(ids)
        if not self.ids:
            raise DataError("no training episodes (the dataset is empty)")
        self.batch_size = max(1, int(batch_size))
        self.sampler = DistributedSampler(range(len(self.ids)), num_replicas=world_size, rank=rank,
                                          shuffle=True, seed=seed, drop_last=False)
        self._epoch: int | None = None
        self._order: list[int] = []

    def indices(self, step: int) -> list[int]:
        per_rank = len(self.sampler)
        # repeat the epoch's order if it is shorter than a batch (tiny datasets)
        reps = -(-self.batch_size // max(1, per_rank))
        batches_per_epoch = max(1, (per_rank * reps) // self.batch_size)
        epoch, k = divmod(step, batches_per_epoch)
        if epoch != self._epoch:
            self.sampler.set_epoch(epoch)
            order = list(self.sampler) * reps
            self._order, self._epoch = order, epoch
        chunk = self._order[k * self.batch_size:(k + 1) * self.batch_size]
        return [self.ids[i] for i in chunk]
