"""Reading locis-rl video files (layout: see :mod:`locis_rl.data.generate`)."""
from __future__ import annotations

import json
import os
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

FORMAT = "locis-rl-video"
SUPPORTED_VERSIONS = (1,)
_HINT = "create one with python -m locis_rl.data.generate"


class DatasetError(ValueError):
    """A file that is missing, unreadable (e.g. truncated) or not a locis-rl video file."""


def _open(path: str):
    import h5py

    if not os.path.exists(path):
        raise DatasetError(f"{path}: no such file; {_HINT}")
    if os.path.isdir(path):
        raise DatasetError(f"{path}: is a directory, not a locis-rl video file")
    try:
        return h5py.File(path, "r")
    except OSError as e:
        raise DatasetError(f"{path}: cannot be read as HDF5 (truncated, corrupt or not HDF5): {e}") from e


def _attr(v: Any) -> Any:
    if isinstance(v, bytes):
        v = v.decode()
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    return v


def _validate(path: str, f: Any) -> dict[str, Any]:
    attrs = {k: _attr(v) for k, v in f.attrs.items()}
    if "format" not in attrs:
        raise DatasetError(f"{path}: not a locis-rl video file (missing attribute 'format'); {_HINT}")
    if attrs["format"] != FORMAT:
        raise DatasetError(f"{path}: not a locis-rl video file (format={attrs['format']!r}, "
                           f"expected {FORMAT!r}); {_HINT}")
    if attrs.get("format_version") not in SUPPORTED_VERSIONS:
        raise DatasetError(f"{path}: unsupported format_version {attrs.get('format_version')!r} "
                           f"(this reader supports {SUPPORTED_VERSIONS})")
    for key in ("episodes", "frames", "has_depth", "has_segmentation"):
        if key not in attrs:
            raise DatasetError(f"{path}: locis-rl video file lacks attribute {key!r} (incomplete file?)")
    n, t = int(attrs["episodes"]), int(attrs["frames"])
    wanted = ["rgb"] + (["depth"] if attrs["has_depth"] else [])
    wanted += ["segmentation"] if attrs["has_segmentation"] else []
    for name in wanted:
        if name not in f:
            raise DatasetError(f"{path}: dataset {name!r} is missing")
        shape = f[name].shape
        if shape[:2] != (n, t):
            raise DatasetError(f"{path}: dataset {name!r} has shape {shape}, expected ({n}, {t}, ...)")
    if f["rgb"].ndim != 5 or f["rgb"].shape[-1] != 3 or f["rgb"].dtype != np.uint8:
        raise DatasetError(f"{path}: dataset 'rgb' must be uint8 (N, T, H, W, 3), "
                           f"got {f['rgb'].dtype} {f['rgb'].shape}")
    if "env_kwargs" in attrs and isinstance(attrs["env_kwargs"], str):
        try:
            attrs["env_kwargs"] = json.loads(attrs["env_kwargs"])
        except json.JSONDecodeError:
            pass
    if isinstance(attrs.get("object_names"), str):
        try:
            attrs["object_names"] = json.loads(attrs["object_names"])
        except json.JSONDecodeError:
            pass
    return attrs


def describe(path: str | os.PathLike) -> dict[str, Any]:
    """The file's attributes (``env_kwargs``/``object_names`` decoded from JSON) plus
    ``datasets``: ``{name: (shape, dtype)}``. Raises :class:`DatasetError` for bad files."""
    path = os.fspath(path)
    with _open(path) as f:
        attrs = _validate(path, f)
        attrs["datasets"] = {k: (tuple(f[k].shape), str(f[k].dtype)) for k in f.keys()}
    return attrs


class VideoDataset(Dataset):
    """Windows of ``seq_len`` frames from one or more locis-rl video files.

    Windows start at frames ``0, stride, 2*stride, ...`` of every episode (``stride`` defaults
    to ``seq_len``, i.e. non-overlapping). Each item is a dict of tensors:

    * ``rgb`` float32 (T, 3, H, W) in [0, 1]
    * ``depth`` float32 (T, 1, H, W) raw metric depth (if the files store depth)
    * ``segmentation`` int64 (T, H, W), 0 = background (if the files store segmentation)
    * ``actions`` (T-1, *A) and ``rewards`` (T-1,) for the steps inside the window (if stored)

    ``image_size`` (int or (H, W)) resizes on the fly: rgb bilinear (antialiased), depth and
    segmentation nearest. With several files, a modality is returned only if every file has it.
    HDF5 handles are opened lazily in each process (first ``__getitem__``), so a ``DataLoader``
    with ``num_workers > 0`` is fine.
    """

    def __init__(self, path: str | os.PathLike | Sequence[str | os.PathLike], seq_len: int = 8,
                 stride: int | None = None, image_size: int | Sequence[int] | None = None):
        paths = [os.fspath(path)] if isinstance(path, (str, os.PathLike)) else [os.fspath(p) for p in path]
        if not paths:
            raise DatasetError("no files given")
        if seq_len < 1:
            raise ValueError("seq_len must be >= 1")
        self.paths, self.seq_len = paths, int(seq_len)
        self.stride = int(stride) if stride else self.seq_len
        if self.stride < 1:
            raise ValueError("stride must be >= 1")
        if image_size is None:
            self.image_size = None
        elif isinstance(image_size, int):
            self.image_size = (image_size, image_size)
        else:
            self.image_size = tuple(int(v) for v in image_size)
        self.attrs: list[dict[str, Any]] = []
        index: list[tuple[int, int, int]] = []
        keys = None
        for fi, p in enumerate(paths):
            with _open(p) as f:
                a = _validate(p, f)
                stored = {k for k in ("rgb", "depth", "segmentation", "actions", "rewards") if k in f}
                if not a["has_depth"]:
                    stored.discard("depth")
                if not a["has_segmentation"]:
                    stored.discard("segmentation")
            n, t = int(a["episodes"]), int(a["frames"])
            if t < self.seq_len:
                raise DatasetError(f"{p}: episodes have {t} frames, fewer than seq_len={self.seq_len}")
            self.attrs.append(a)
            keys = stored if keys is None else keys & stored
            index.extend((fi, e, s) for e in range(n) for s in range(0, t - self.seq_len + 1, self.stride))
        self.keys = sorted(keys or {"rgb"})
        self._index = np.asarray(index, dtype=np.int64).reshape(-1, 3)
        self._files: dict[int, Any] = {}
        self._pid: int | None = None

    def __len__(self) -> int:
        return len(self._index)

    def _file(self, fi: int):
        if self._pid != os.getpid():  # fresh process (DataLoader worker): never reuse a parent's handle
            self._files, self._pid = {}, os.getpid()
        f = self._files.get(fi)
        if f is None:
            f = self._files[fi] = _open(self.paths[fi])
        return f

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_files"], state["_pid"] = {}, None
        return state

    def close(self) -> None:
        if self._pid == os.getpid():
            for f in self._files.values():
                try:
                    f.close()
                except Exception:
                    pass
        self._files = {}

    def __del__(self) -> None:  # pragma: no cover
        try:
            self.close()
        except Exception:
            pass

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        fi, ep, s = (int(v) for v in self._index[i])
        f = self._file(fi)
        sl = slice(s, s + self.seq_len)
        try:
            out: dict[str, torch.Tensor] = {}
            rgb = torch.from_numpy(np.ascontiguousarray(f["rgb"][ep, sl]))
            out["rgb"] = rgb.permute(0, 3, 1, 2).float().div_(255.0)
            if "depth" in self.keys:
                depth = np.asarray(f["depth"][ep, sl], dtype=np.float32)
                out["depth"] = torch.from_numpy(depth).permute(0, 3, 1, 2).contiguous()
            if "segmentation" in self.keys:
                out["segmentation"] = torch.from_numpy(np.asarray(f["segmentation"][ep, sl]).astype(np.int64))
            if "actions" in self.keys:
                out["actions"] = torch.from_numpy(np.asarray(f["actions"][ep, s:s + self.seq_len - 1]))
            if "rewards" in self.keys:
                rewards = np.asarray(f["rewards"][ep, s:s + self.seq_len - 1], dtype=np.float32)
                out["rewards"] = torch.from_numpy(rewards)
        except OSError as e:
            raise DatasetError(f"{self.paths[fi]}: failed reading episode {ep} "
                               f"frames {s}..{s + self.seq_len - 1}: {e}") from e
        if self.image_size is not None and tuple(out["rgb"].shape[-2:]) != self.image_size:
            import torch.nn.functional as F

            out["rgb"] = F.interpolate(out["rgb"], size=self.image_size, mode="bilinear", align_corners=False,
                                       antialias=True).clamp_(0.0, 1.0)
            if "depth" in out:
                out["depth"] = F.interpolate(out["depth"], size=self.image_size, mode="nearest-exact")
            if "segmentation" in out:
                seg = out["segmentation"][:, None].float()
                out["segmentation"] = F.interpolate(seg, size=self.image_size, mode="nearest-exact")[:, 0].long()
        return out
