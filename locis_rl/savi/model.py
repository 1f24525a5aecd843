"""SAVi (Slot Attention for Video) as a baseline with the explicit-state interface of :class:`LociS`.

Paper: Kipf et al., "Conditional Object-Centric Learning from Video", ICLR 2022 (section 2,
appendix A.6); SAVi++-style depth prediction (``config.predict_depth``). One step per frame:

    frame [B,3(+1),H,W] -> CNN encoder + position embedding + MLP -> features [B, H'*W', F]
    [first frame of a row: slots from the initializer (learned / sampled / boxes / centres)]
    predicted slots [B,K,D] -> Slot Attention corrector (+GRU) -> slots [B,K,D]
        -> spatial-broadcast decoder (per slot: rgb, (depth), alpha logit) -> softmax over slots
        -> Transformer predictor -> slots for the next frame (kept in the state)

Everything recurrent lives in a :class:`tensordict.TensorDict` with ``batch_size [B]``; the module
keeps no buffers. Rows never interact: LayerNorm only, attention within a row, and sampled initial
slots drawn from a per-row counter-based hash of ``state["rng_seed"]``.

The outputs carry the keys a LociS consumer reads (``position``, ``gestalt``, ``presence``,
``masks`` with a trailing all-zero background channel, ``object_masks``, ``slot_depth``, ``rgb``);
SAVi has no background slot, so every pixel belongs to some slot.

Example:
    >>> model = SAVi("tiny").eval()
    >>> state = model.init_state(2, seed=0)
    >>> out, state = model.step(torch.rand(2, 3, 64, 64), state=state)
    >>> out["masks"].shape, out["position"].shape, state["slots"].shape
    (torch.Size([2, 7, 64, 64]), torch.Size([2, 6, 4]), torch.Size([2, 6, 64]))
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tensordict import TensorDict
from torch import nn

from locis_rl.model.depth_input import scene_relative_depth
from locis_rl.model.checkpoint_io import CheckpointError, load_model_checkpoint, save_model_checkpoint
from locis_rl.model.locis import row_uniform, rows_where, validate_step_inputs
from locis_rl.savi.config import SAViConfig

__all__ = [
    "SAVi",
    "SAViEncoder",
    "SlotAttention",
    "SlotTransformerPredictor",
    "BroadcastDecoder",
    "boxes_from_segmentation",
    "CheckpointError",
]

MODEL_NAME = "SAVi"
"""The ``"model"`` entry of checkpoints written by :meth:`SAVi.save_pretrained`."""

# Random stream ids mixed into the per-row hash (distinct from LociS's 1-4 for clarity only).
_STREAM_SEED_FROM_INT = 21
_STREAM_RESEED = 22
_STREAM_INITIAL_SLOTS = 23


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------
def _linspace_coords(n: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Pixel-index coordinates in ``[-1, 1]`` (``-1 + 2 i / (n - 1)``), as LociS positions use."""
    if n <= 1:
        return torch.zeros(n, device=device, dtype=dtype)
    return torch.linspace(-1.0, 1.0, n, device=device, dtype=dtype)


def position_grid(h: int, w: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``[h, w, 4]`` linear position embedding ``(y, x, -y, -x)``: the coordinate along each of the
    four cardinal directions, in ``[-1, 1]`` (Slot Attention / SAVi)."""
    y = _linspace_coords(h, device, dtype)[:, None].expand(h, w)
    x = _linspace_coords(w, device, dtype)[None, :].expand(h, w)
    return torch.stack([y, x, -y, -x], dim=-1)


def _derive_seeds(base: torch.Tensor, counter: torch.Tensor, stream: int) -> torch.Tensor:
    """``[B]`` int64 seeds in ``[0, 2**48)`` hashed from per-row ``base`` and ``counter``."""
    u = row_uniform(base, counter, stream, 2, dtype=torch.float64)
    # row_uniform returns ((h + 0.5) / 2**24) exactly in float64, so floor recovers the 24 bits h.
    bits = torch.floor(u * float(1 << 24)).to(torch.int64)
    return (bits[:, 0] << 24) | bits[:, 1]


def _seeds_for_rows(seed: int | torch.Tensor | None, b: int, device: torch.device,
                    generator: torch.Generator | None) -> torch.Tensor:
    rows = torch.arange(b, device=device, dtype=torch.int64)
    if seed is None:
        seeds = torch.randint(0, 2 ** 62, (b,), generator=generator,
                              device=generator.device if generator is not None else "cpu")
        return seeds.to(device)
    if isinstance(seed, torch.Tensor):
        if seed.shape != (b,):
            raise ValueError(f"seed: expected an int or an int64 tensor of shape [{b}], actual shape: "
                             f"{tuple(seed.shape)}")
        return seed.to(device=device, dtype=torch.int64)
    base = torch.full((b,), int(seed) & (2 ** 62 - 1), device=device, dtype=torch.int64)
    return _derive_seeds(base, rows, _STREAM_SEED_FROM_INT)


def _row_normal(seed: torch.Tensor, frame: torch.Tensor, stream: int, *shape: int,
                dtype: torch.dtype) -> torch.Tensor:
    """Standard normals ``[B, *shape]`` that depend only on each row's (seed, frame) (Box-Muller)."""
    u = row_uniform(seed, frame, stream, 2, *shape, dtype=torch.float64)
    z = torch.sqrt(-2.0 * torch.log(u[:, 0])) * torch.cos(2.0 * math.pi * u[:, 1])
    return z.to(dtype)


def _mask_moments(weights: torch.Tensor) -> torch.Tensor:
    """Centroid and isotropic std of non-negative maps ``[B,K,h,w]`` -> ``[B,K,4]`` = ``(x, y, std, 0)``.

    ``x`` to the right, ``y`` down, both in ``[-1, 1]`` (pixel-index coordinates, as LociS);
    ``std = sqrt((var_x + var_y) / 2)`` in the same units; an empty map gives ``(0, 0, 0, 0)``.
    """
    h, w = weights.shape[-2:]
    xs = _linspace_coords(w, weights.device, weights.dtype)
    ys = _linspace_coords(h, weights.device, weights.dtype)
    col = weights.sum(dim=-2)  # [B,K,w]
    row = weights.sum(dim=-1)  # [B,K,h]
    mass = col.sum(dim=-1).clamp_min(1e-6)
    mx = (col * xs).sum(dim=-1) / mass
    my = (row * ys).sum(dim=-1) / mass
    var = ((col * (xs - mx[..., None]).pow(2)).sum(dim=-1)
           + (row * (ys - my[..., None]).pow(2)).sum(dim=-1)) / (2.0 * mass)
    std = var.clamp_min(1e-12).sqrt()
    return torch.stack([mx, my, std, torch.zeros_like(mx)], dim=-1)


# ----------------------------------------------------------------------------------------------
# Blocks
# ----------------------------------------------------------------------------------------------
class SAViEncoder(nn.Module):
    """CNN encoder (table A.5): ``image [B,C,H,W] -> features [B, H'*W', feature_dim]``.

    Convs (ReLU between) -> + linear projection of the 4-d position grid -> LayerNorm over channels
    -> per-position MLP (the paper's two 1x1 convs).
    """

    def __init__(self, in_channels: int, channels: tuple[int, ...], strides: tuple[int, ...],
                 kernel_size: int, mlp_hidden: int, feature_dim: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for i, (out, stride) in enumerate(zip(channels, strides)):
            layers.append(nn.Conv2d(c, out, kernel_size, stride=stride, padding=kernel_size // 2))
            if i < len(channels) - 1:
                layers.append(nn.ReLU())
            c = out
        self.convs = nn.Sequential(*layers)
        self.position = nn.Linear(4, c)
        self.norm = nn.LayerNorm(c)
        self.mlp = nn.Sequential(nn.Linear(c, mlp_hidden), nn.ReLU(), nn.Linear(mlp_hidden, feature_dim))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = self.convs(image)
        _, _, h, w = x.shape
        grid = position_grid(h, w, x.device, x.dtype).reshape(h * w, 4)
        x = x.flatten(2).transpose(1, 2) + self.position(grid)
        return self.mlp(self.norm(x))


class SlotAttention(nn.Module):
    """Slot Attention corrector (eq. 1): attention normalised over slots, weighted mean over inputs,
    GRU update, optional residual MLP.

    ``forward(slots [B,K,D], inputs [B,N,F], iterations [B] int64, max_iterations int)
    -> (slots [B,K,D], attention [B,K,N])``. Row ``b`` runs ``iterations[b]`` iterations (the loop runs
    ``max_iterations`` and freezes rows that are done); ``attention`` is that of each row's last one.
    """

    def __init__(self, slot_dim: int, feature_dim: int, *, residual_mlp: bool, mlp_hidden: int,
                 epsilon: float) -> None:
        super().__init__()
        self.norm_inputs = nn.LayerNorm(feature_dim)
        self.norm_slots = nn.LayerNorm(slot_dim)
        self.to_q = nn.Linear(slot_dim, slot_dim, bias=False)
        self.to_k = nn.Linear(feature_dim, slot_dim, bias=False)
        self.to_v = nn.Linear(feature_dim, slot_dim, bias=False)
        self.gru = nn.GRUCell(slot_dim, slot_dim)
        self.mlp = (nn.Sequential(nn.LayerNorm(slot_dim), nn.Linear(slot_dim, mlp_hidden), nn.ReLU(),
                                  nn.Linear(mlp_hidden, slot_dim)) if residual_mlp else None)
        self.epsilon = epsilon
        self.scale = slot_dim ** -0.5

    def forward(self, slots: torch.Tensor, inputs: torch.Tensor, iterations: torch.Tensor,
                max_iterations: int) -> tuple[torch.Tensor, torch.Tensor]:
        b, k, d = slots.shape
        x = self.norm_inputs(inputs)
        keys, values = self.to_k(x), self.to_v(x)
        attention = slots.new_zeros(b, k, inputs.shape[1])
        for i in range(max_iterations):
            q = self.to_q(self.norm_slots(slots))
            attn = torch.einsum("bkd,bnd->bkn", q, keys).mul(self.scale).softmax(dim=1)
            weights = attn + self.epsilon
            weights = weights / weights.sum(dim=-1, keepdim=True)
            updates = torch.einsum("bkn,bnd->bkd", weights, values)
            new = self.gru(updates.reshape(b * k, d), slots.reshape(b * k, d)).view(b, k, d)
            if self.mlp is not None:
                new = new + self.mlp(new)
            if i == 0:
                slots, attention = new, attn
            else:
                active = (iterations > i)[:, None, None]
                slots = torch.where(active, new, slots)
                attention = torch.where(active, attn, attention)
        return slots, attention


class _PostNormBlock(nn.Module):
    """``s = LN(s + MHSA(s)); s = LN(s + MLP(s))`` (eq. 2)."""

    def __init__(self, dim: int, heads: int, mlp_hidden: int) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm_attention = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_hidden), nn.ReLU(), nn.Linear(mlp_hidden, dim))
        self.norm_mlp = nn.LayerNorm(dim)

    def forward(self, slots: torch.Tensor) -> torch.Tensor:
        slots = self.norm_attention(slots + self.attention(slots, slots, slots, need_weights=False)[0])
        return self.norm_mlp(slots + self.mlp(slots))


class SlotTransformerPredictor(nn.Module):
    """Transformer-encoder predictor over the slots of one row: ``[B,K,D] -> [B,K,D]``."""

    def __init__(self, dim: int, heads: int, mlp_hidden: int, layers: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(_PostNormBlock(dim, heads, mlp_hidden) for _ in range(layers))

    def forward(self, slots: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            slots = block(slots)
        return slots


class BroadcastDecoder(nn.Module):
    """Spatial-broadcast decoder (table A.6): ``slots [N, D] -> [N, out_channels, H, W]``.

    Each slot is tiled on a ``broadcast_size`` grid, a linear position embedding added, then
    transposed convs (ReLU between; each multiplies the size by its stride) and a 1x1 head.
    """

    def __init__(self, slot_dim: int, broadcast_size: int, channels: tuple[int, ...],
                 strides: tuple[int, ...], kernel_size: int, out_channels: int) -> None:
        super().__init__()
        self.broadcast_size = broadcast_size
        self.position = nn.Linear(4, slot_dim)
        layers: list[nn.Module] = []
        c = slot_dim
        for i, (out, stride) in enumerate(zip(channels, strides)):
            layers.append(nn.ConvTranspose2d(c, out, kernel_size, stride=stride, padding=kernel_size // 2,
                                             output_padding=stride - 1))
            if i < len(channels) - 1:
                layers.append(nn.ReLU())
            c = out
        self.convs = nn.Sequential(*layers)
        self.head = nn.Conv2d(c, out_channels, 1)

    def forward(self, slots: torch.Tensor) -> torch.Tensor:
        g = self.broadcast_size
        grid = position_grid(g, g, slots.device, slots.dtype)
        x = slots[:, None, None, :] + self.position(grid)[None]  # [N, g, g, D]
        return self.head(self.convs(x.permute(0, 3, 1, 2)))


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------
class SAVi(nn.Module):
    """SAVi with an explicit per-row recurrent state and LociS-compatible outputs.

    Args:
        config: a :class:`SAViConfig` or a preset name (``"tiny"``, ``"small"``; ``configs/model/savi-*.yaml``).

    Submodules: ``encoder`` (:class:`SAViEncoder`), ``corrector`` (:class:`SlotAttention`),
    ``predictor`` (:class:`SlotTransformerPredictor` or ``None`` for ``predictor.kind="identity"``),
    ``decoder`` (:class:`BroadcastDecoder`); initializer: ``slot_init [K,D]`` (learned),
    ``slot_mu`` / ``slot_log_sigma [D]`` (sampled) or ``init_mlp`` (boxes / centres).

    State keys (``B`` rows, ``K`` slots, ``D`` slot size): ``slots [B,K,D]`` the predictor's slots
    for the coming frame (ignored for rows with ``initialized=False``); ``initialized [B]`` bool;
    ``frame_index [B]`` int64; ``rng_seed [B]`` int64 (per-row randomness of sampled init).

    Example:
        >>> model = SAVi(SAViConfig.preset("tiny").replace(conditioning="centers")).eval()
        >>> cond = {"centers": torch.tensor([[[0.5, 0.5]]])}  # (y, x) in [0, 1]; missing slots: -1
        >>> out, state = model.step(torch.rand(1, 3, 64, 64), conditioning=cond)
        >>> out["object_masks"].shape
        torch.Size([1, 6, 64, 64])
    """

    def __init__(self, config: SAViConfig | str = "small") -> None:
        super().__init__()
        if isinstance(config, str):
            config = SAViConfig.preset(config)
        if not isinstance(config, SAViConfig):
            raise TypeError(f"config: expected a SAViConfig or a preset name, actual value: {config!r}")
        self.config = config = config.validate()
        k, d = config.num_slots, config.slot_dim
        enc, cor, pred, dec, ini = (config.encoder, config.corrector, config.predictor, config.decoder,
                                    config.initializer)
        self.encoder = SAViEncoder(config.image_channels, enc.channels, enc.strides, enc.kernel_size,
                                   enc.mlp_hidden, enc.feature_dim)
        self.corrector = SlotAttention(d, enc.feature_dim, residual_mlp=cor.residual_mlp,
                                       mlp_hidden=cor.mlp_hidden, epsilon=cor.epsilon)
        self.predictor = (SlotTransformerPredictor(d, pred.heads, pred.mlp_hidden, pred.layers)
                          if pred.kind == "transformer" else None)
        self.decoder = BroadcastDecoder(d, dec.broadcast_size, dec.channels, dec.strides, dec.kernel_size,
                                        out_channels=3 + int(config.predict_depth) + 1)
        if config.conditioning == "unconditional-learned":
            self.slot_init = nn.Parameter(torch.randn(k, d) * d ** -0.5)
        elif config.conditioning == "unconditional-sampled":
            self.slot_mu = nn.Parameter(torch.randn(d) * d ** -0.5)
            self.slot_log_sigma = nn.Parameter(torch.full((d,), math.log(ini.initial_sigma)))
        else:
            coords = 4 if config.conditioning == "boxes" else 2
            self.init_mlp = nn.Sequential(nn.Linear(coords, ini.hidden), nn.ReLU(), nn.Linear(ini.hidden, d))
        self.check_inputs = True
        """Validate ``rgb`` / ``depth`` values in :meth:`step` (one host sync); shapes always are."""

    # ---- state ------------------------------------------------------------------------------
    def _device_dtype(self) -> tuple[torch.device, torch.dtype]:
        p = next(self.parameters())
        return p.device, p.dtype

    def init_state(self, batch_size: int, device: torch.device | str | None = None, *,
                   seed: int | torch.Tensor | None = 0,
                   generator: torch.Generator | None = None) -> TensorDict:
        """A fresh state for ``batch_size`` rows (all ``initialized=False``).

        Args:
            seed: ``int`` -> per-row seeds hashed from ``(seed, row index)``; an int64 tensor ``[B]``
                -> the rows' seeds; ``None`` -> drawn from ``generator`` (or torch's global one).

        Returns:
            TensorDict ``[B]``: ``slots [B,K,D]`` (zeros), ``initialized [B]``, ``frame_index [B]``,
            ``rng_seed [B]``.
        """
        cfg = self.config
        param_device, dtype = self._device_dtype()
        device = torch.device(device) if device is not None else param_device
        b = int(batch_size)
        return TensorDict({
            "slots": torch.zeros(b, cfg.num_slots, cfg.slot_dim, device=device, dtype=dtype),
            "initialized": torch.zeros(b, dtype=torch.bool, device=device),
            "frame_index": torch.zeros(b, dtype=torch.int64, device=device),
            "rng_seed": _seeds_for_rows(seed, b, device, generator),
        }, batch_size=[b], device=device)

    def reset_state(self, state: TensorDict, mask: torch.Tensor, *,
                    seed: int | torch.Tensor | None = None) -> TensorDict:
        """Re-initialise the rows in ``mask [B]`` (bool); the other rows are kept bit for bit.

        Seeds of reset rows: ``seed`` as in :meth:`init_state`; ``None`` derives a new seed from the
        row's old seed and frame index (deterministic per row, so a new episode gets new samples).

        Returns:
            a new TensorDict (the input is not modified).
        """
        b = state.batch_size[0]
        mask = torch.as_tensor(mask, device=state.device)
        if mask.dtype != torch.bool or mask.shape != (b,):
            raise ValueError(f"mask: expected a bool tensor of shape [{b}], actual: dtype {mask.dtype}, "
                             f"shape {tuple(mask.shape)}")
        if seed is None:
            seed = _derive_seeds(state["rng_seed"], state["frame_index"], _STREAM_RESEED)
        fresh = self.init_state(b, state.device, seed=seed)
        return rows_where(mask, fresh, state)

    @staticmethod
    def detach_state(state: TensorDict) -> TensorDict:
        """The same state cut from the autograd graph (truncated BPTT); a new TensorDict."""
        return state.detach()

    # ---- input validation ---------------------------------------------------------------------
    def _validate(self, rgb: Any, depth: Any, state: TensorDict | None) -> None:
        validate_step_inputs(self.config, rgb, depth, state, check_values=self.check_inputs, state_key="slots")

    # ---- building blocks of a step ------------------------------------------------------------
    def _conditioning_coordinates(self, conditioning: dict[str, Any] | None, b: int, first: torch.Tensor,
                                  device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """``[B, K, 4 | 2]`` box / centre coordinates; unconditioned slots get -1 (as the paper)."""
        cfg = self.config
        key = "boxes" if cfg.conditioning == "boxes" else "centers"
        size = 4 if key == "boxes" else 2
        k = cfg.num_slots
        layout = ("{'boxes': [B, K, 4] (y0, x0, y1, x1) in [0, 1]" if key == "boxes"
                  else "{'centers': [B, K, 2] (y, x) in [0, 1]")
        if conditioning is None or not isinstance(conditioning, dict) or key not in conditioning:
            rows = first.nonzero().squeeze(1).tolist()
            given = "None" if conditioning is None else (
                f"a dict with keys {sorted(conditioning)}" if isinstance(conditioning, dict)
                else type(conditioning).__name__)
            raise ValueError(
                f"conditioning: config.conditioning={cfg.conditioning!r} needs first-frame {key} for the "
                f"rows starting an episode (initialized=False: rows {rows}); pass conditioning="
                f"{layout}, optional 'valid': [B, K] bool}}, e.g. from boxes_from_segmentation("
                f"segmentation, {k}) on the first frame; actual value: {given}")
        coords = torch.as_tensor(conditioning[key], device=device, dtype=dtype)
        if coords.dim() != 3 or coords.shape[0] != b or coords.shape[2] != size or coords.shape[1] > k:
            raise ValueError(f"conditioning[{key!r}]: expected shape [{b}, M <= {k}, {size}], actual shape: "
                             f"{tuple(coords.shape)}")
        m = coords.shape[1]
        valid = conditioning.get("valid")
        if valid is not None:
            valid = torch.as_tensor(valid, device=device).to(torch.bool)
            if valid.shape != (b, m):
                raise ValueError(f"conditioning['valid']: expected shape [{b}, {m}], actual shape: "
                                 f"{tuple(valid.shape)}")
            coords = torch.where(valid[..., None], coords, torch.full_like(coords, -1.0))
        if m < k:
            coords = torch.cat([coords, coords.new_full((b, k - m, size), -1.0)], dim=1)
        return coords

    def initial_slots(self, state: TensorDict, conditioning: dict[str, Any] | None = None,
                      generator: torch.Generator | None = None) -> torch.Tensor:
        """Initial slots ``[B,K,D]`` of every row (the caller keeps those of fresh rows).

        ``unconditional-sampled`` draws ``mu + sigma * z`` with ``z`` from the row's
        ``(rng_seed, frame_index)`` hash, or from ``generator`` when one is given (shared stream).
        """
        cfg = self.config
        b, k, d = state.batch_size[0], cfg.num_slots, cfg.slot_dim
        device, dtype = state.device, self._device_dtype()[1]
        if cfg.conditioning == "unconditional-learned":
            return self.slot_init[None].expand(b, k, d)
        if cfg.conditioning == "unconditional-sampled":
            if generator is not None:
                z = torch.randn(b, k, d, generator=generator, device=generator.device).to(device, dtype)
            else:
                z = _row_normal(state["rng_seed"], state["frame_index"], _STREAM_INITIAL_SLOTS, k, d,
                                dtype=dtype)
            return self.slot_mu + self.slot_log_sigma.exp() * z
        coords = self._conditioning_coordinates(conditioning, b, ~state["initialized"], device, dtype)
        return self.init_mlp(coords)

    def decode(self, slots: torch.Tensor) -> dict[str, torch.Tensor]:
        """Decode slots ``[B,K,D]`` -> dict(``mask_logits [B,K,H,W]``, ``object_masks [B,K,H,W]``
        (softmax over slots), ``slot_rgb [B,K,3,H,W]``, ``rgb [B,3,H,W]``, and with
        ``predict_depth`` ``slot_depth_map [B,K,1,H,W]``, ``depth [B,1,H,W]``). RGB and depth pass
        a sigmoid (RGB in ``[0, 1]``, depth in scene-relative units)."""
        b, k, d = slots.shape
        s = self.config.image_size
        raw = self.decoder(slots.reshape(b * k, d)).view(b, k, -1, s, s)
        mask_logits = raw[:, :, -1]
        masks = mask_logits.softmax(dim=1)
        slot_rgb = torch.sigmoid(raw[:, :, :3])
        out = {"mask_logits": mask_logits, "object_masks": masks, "slot_rgb": slot_rgb,
               "rgb": (masks[:, :, None] * slot_rgb).sum(dim=1)}
        if self.config.predict_depth:
            slot_depth = torch.sigmoid(raw[:, :, 3:4])
            out["slot_depth_map"] = slot_depth
            out["depth"] = (masks[:, :, None] * slot_depth).sum(dim=1)
        return out

    def predict(self, slots: torch.Tensor) -> torch.Tensor:
        """Predictor: slots ``[B,K,D]`` after the corrector -> initial slots of the next frame."""
        return slots if self.predictor is None else self.predictor(slots)

    # ---- the step -----------------------------------------------------------------------------
    def step(self, rgb: torch.Tensor, depth: torch.Tensor | None = None, state: TensorDict | None = None,
             *, conditioning: dict[str, Any] | None = None, mode: str | None = None,
             generator: torch.Generator | None = None) -> tuple[TensorDict, TensorDict]:
        """One perception step on a batch of frames.

        Args:
            rgb: ``[B, 3, H, W]`` float in ``[0, 1]``, ``H = W = config.image_size``.
            depth: ``[B, 1, H, W]`` raw metric depth; required with ``config.use_depth`` (encoder
                input); otherwise optional, and then only used for ``out["slot_depth"]``.
            state: from :meth:`init_state` / a previous step; ``None`` = a fresh state (seed 0).
            conditioning: for ``boxes`` / ``centers`` models, needed whenever a row starts
                (``initialized=False``): ``{"boxes": [B, M<=K, 4]}`` ``(y0, x0, y1, x1)`` or
                ``{"centers": [B, M<=K, 2]}`` ``(y, x)``, normalised to ``[0, 1]`` of the image
                height / width, optional ``"valid": [B, M]`` bool; missing / invalid slots get -1.
                Ignored for rows already initialised and by unconditional models.
            mode: ``None`` or ``config.conditioning`` (the initialisation is fixed by the weights;
                accepted for call compatibility with ``LociS.step``).
            generator: ``None`` -> sampled initial slots from the per-row ``rng_seed`` hash (rows
                independent); a ``torch.Generator`` -> drawn from that shared stream instead.

        Returns:
            ``(out, state)``; ``out`` a TensorDict ``[B]``: ``position [B,K,4]`` (x, y centroid of
            the slot's mask in [-1, 1], std, priority 0), ``gestalt [B,K,D]`` (corrected slots),
            ``presence [B,K]`` float 0/1, ``masks [B,K+1,H,W]`` (slot masks + all-zero background),
            ``object_masks [B,K,H,W]``, ``mask_logits [B,K,H,W]``, ``slot_depth [B,K,1]``,
            ``rgb [B,3,H,W]``, ``slot_rgb [B,K,3,H,W]``, ``attention [B,K,H',W']``,
            ``next_gestalt [B,K,D]`` (predictor output), and with ``predict_depth`` ``depth
            [B,1,H,W]`` / ``slot_depth_map [B,K,1,H,W]``; with depth given, ``scene_depth [B,1,H,W]``.
        """
        self._validate(rgb, depth, state)
        cfg = self.config
        if mode is not None and mode != cfg.conditioning:
            raise ValueError(f"mode: this SAVi was built with conditioning={cfg.conditioning!r}; expected "
                             f"None or that value, actual value: {mode!r} (the initializer's weights fix "
                             f"the mode: build another SAVi to change it)")
        b, k, s = rgb.shape[0], cfg.num_slots, cfg.image_size
        if state is None:
            state = self.init_state(b, rgb.device, seed=0 if generator is None else None, generator=generator)
        _, dtype = self._device_dtype()
        rgb = rgb.to(dtype)
        scene_depth = scene_relative_depth(depth.to(dtype)) if depth is not None else None
        image = torch.cat([rgb, scene_depth], dim=1) if cfg.use_depth else rgb
        features = self.encoder(image)  # [B, N, F]

        # Rows starting an episode take the initializer's slots and more corrector iterations.
        first = ~state["initialized"]
        slots = state["slots"].to(dtype)
        cor = cfg.corrector
        if bool(first.any()):  # one host sync: the initializer / extra iterations only when needed
            slots = torch.where(first[:, None, None], self.initial_slots(state, conditioning, generator), slots)
            iterations = torch.where(first, cor.first_frame_iterations, cor.iterations)
            max_iterations = max(cor.first_frame_iterations, cor.iterations)
        else:
            iterations = torch.full_like(state["frame_index"], cor.iterations)
            max_iterations = cor.iterations
        slots, attention = self.corrector(slots, features, iterations, max_iterations)
        dec = self.decode(slots)
        next_slots = self.predict(slots)

        object_masks = dec["object_masks"]
        fs = cfg.feature_size
        attention = attention.view(b, k, fs, fs)
        position = _mask_moments(object_masks if cfg.position_source == "mask" else attention)
        presence = (object_masks.mean(dim=(-2, -1)) > cfg.presence_threshold).to(dtype)
        weight = object_masks[:, :, None]  # [B,K,1,H,W]
        if cfg.predict_depth:
            depth_source = dec["slot_depth_map"]
        elif scene_depth is not None:
            depth_source = scene_depth[:, None]
        else:
            depth_source = None
        if depth_source is not None:
            slot_depth = (weight * depth_source).sum(dim=(-2, -1)) / weight.sum(dim=(-2, -1)).clamp_min(1e-6)
        else:
            slot_depth = rgb.new_zeros(b, k, 1)

        out = TensorDict({
            "position": position,
            "gestalt": slots,
            "presence": presence,
            "masks": torch.cat([object_masks, object_masks.new_zeros(b, 1, s, s)], dim=1),
            "object_masks": object_masks,
            "mask_logits": dec["mask_logits"],
            "slot_depth": slot_depth,
            "rgb": dec["rgb"],
            "slot_rgb": dec["slot_rgb"],
            "attention": attention,
            "next_gestalt": next_slots,
        }, batch_size=[b], device=state.device)
        if cfg.predict_depth:
            out["depth"] = dec["depth"]
            out["slot_depth_map"] = dec["slot_depth_map"]
        if scene_depth is not None:
            out["scene_depth"] = scene_depth
        new_state = TensorDict({
            "slots": next_slots,
            "initialized": torch.ones_like(first),
            "frame_index": state["frame_index"] + 1,
            "rng_seed": state["rng_seed"],
        }, batch_size=[b], device=state.device)
        return out, new_state

    forward = step

    # ---- losses -------------------------------------------------------------------------------
    def loss(self, out: TensorDict, target_rgb: torch.Tensor, target_depth: torch.Tensor | None = None, *,
             depth_weight: float = 1.0, depth_is_relative: bool = False) -> dict[str, torch.Tensor]:
        """Reconstruction loss of one step (SAVi with an RGB target: our scenes have no flow).

        Args:
            out: from :meth:`step`; target_rgb ``[B,3,H,W]`` in ``[0, 1]`` (the frame given to it).
            target_depth: ``[B,1,H,W]`` raw metric depth (compared in scene-relative units), or
                already scene-relative with ``depth_is_relative=True``; used with ``predict_depth``.

        Returns:
            dict of scalars: ``rgb`` (MSE), ``depth`` (MSE; 0 when not predicted / no target) and
            ``total = rgb + depth_weight * depth``.
        """
        rgb = F.mse_loss(out["rgb"], target_rgb.to(out["rgb"].dtype))
        depth = rgb.new_zeros(())
        if self.config.predict_depth and target_depth is not None:
            target = target_depth if depth_is_relative else scene_relative_depth(target_depth)
            depth = F.mse_loss(out["depth"], target.to(out["depth"].dtype))
        return {"total": rgb + depth_weight * depth, "rgb": rgb, "depth": depth}

    # ---- checkpoints --------------------------------------------------------------------------
    def save_pretrained(self, path: str | os.PathLike) -> Path:
        """Write a checkpoint atomically (temporary file + ``os.replace``). Returns the path.

        Layout: see :mod:`locis_rl.model.checkpoint_io` (``"model": "SAVi"``, as LociS's).
        """
        return save_model_checkpoint(self, MODEL_NAME, path)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, map_location: Any = "cpu", *,
                        config: SAViConfig | str | None = None) -> "SAVi":
        """Load a checkpoint written by :meth:`save_pretrained`.

        Args:
            config: expected config; every field must equal the checkpoint's (else
                :class:`CheckpointError` naming the differing fields). ``None``: the checkpoint's own.

        Raises:
            FileNotFoundError: no such file.
            CheckpointError: foreign file, wrong version, a LociS (not SAVi) checkpoint, missing
                keys, config or parameter-shape mismatches (named in the message).
        """
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no SAVi checkpoint at {path} (write one with SAVi.save_pretrained)")
        expected = SAViConfig.preset(config) if isinstance(config, str) else config
        return load_model_checkpoint(
            path, model_name=MODEL_NAME, config_from_dict=SAViConfig.from_dict, build=cls,
            expected_config=expected, map_location=map_location,
            wrong_model_hints={"LociS": "; load it with LociS.from_pretrained"})

    def extra_repr(self) -> str:
        c = self.config
        return (f"image_size={c.image_size}, num_slots={c.num_slots}, slot_dim={c.slot_dim}, "
                f"conditioning={c.conditioning!r}, use_depth={c.use_depth}, predict_depth={c.predict_depth}")


# ----------------------------------------------------------------------------------------------
# Conditioning from ground truth
# ----------------------------------------------------------------------------------------------
def boxes_from_segmentation(segmentation: torch.Tensor, max_objects: int
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """First-frame bounding boxes and centres of mass of the objects of an instance segmentation.

    Vectorised over rows and objects (scatter reductions; one host sync for the largest id).

    Args:
        segmentation: ``[B, H, W]`` integer ids, ``0`` = background, ``1..`` objects.
        max_objects: ``K``, the number of slots. With more objects, the ``K`` largest (by pixel
            count) are kept; the kept objects are ordered by ascending id.

    Returns:
        ``boxes [B,K,4]`` ``(y0, x0, y1, x1)``: pixel-edge extents divided by ``H`` / ``W`` (so in
        ``[0, 1]``; a one-pixel object at row ``r`` has ``y0 = r/H``, ``y1 = (r+1)/H``);
        ``centers [B,K,2]`` ``(y, x)``: mean of the pixel centres ``((r + 0.5)/H, (c + 0.5)/W)``;
        ``valid [B,K]`` bool. Invalid entries are ``-1`` (the paper's "no conditioning" value).
    """
    if segmentation.dim() != 3 or segmentation.dtype.is_floating_point or segmentation.dtype == torch.bool:
        raise ValueError(f"segmentation: expected an integer tensor [B, H, W], actual: dtype "
                         f"{segmentation.dtype}, shape {tuple(segmentation.shape)}")
    b, h, w = segmentation.shape
    k = int(max_objects)
    device = segmentation.device
    seg = segmentation.to(torch.int64).clamp_min(0).reshape(b, h * w)
    m = int(seg.max()) + 1 if seg.numel() else 1
    rows = torch.arange(h, device=device).repeat_interleave(w).expand(b, -1)
    cols = torch.arange(w, device=device).repeat(h).expand(b, -1)
    counts = torch.zeros(b, m, device=device, dtype=torch.int64).scatter_add_(1, seg, torch.ones_like(seg))
    big = h + w + 1

    def reduce(values: torch.Tensor, how: str, fill: int) -> torch.Tensor:
        init = torch.full((b, m), fill, device=device, dtype=torch.int64)
        return init.scatter_reduce(1, seg, values, reduce=how, include_self=True)

    y0, y1 = reduce(rows, "amin", big), reduce(rows, "amax", -1)
    x0, x1 = reduce(cols, "amin", big), reduce(cols, "amax", -1)
    sum_y = torch.zeros(b, m, device=device, dtype=torch.float64).scatter_add_(1, seg, rows.to(torch.float64))
    sum_x = torch.zeros(b, m, device=device, dtype=torch.float64).scatter_add_(1, seg, cols.to(torch.float64))

    # Pick up to K objects: largest first, then order the picked ones by id.
    score = counts.clone()
    score[:, 0] = 0  # background is never an object
    take = min(k, m)
    top_count, top_id = score.topk(take, dim=1)
    ok = top_count > 0
    order_key = torch.where(ok, top_id, torch.full_like(top_id, m))
    order_key, perm = order_key.sort(dim=1)
    ids, ok = top_id.gather(1, perm), ok.gather(1, perm)

    def pick(x: torch.Tensor) -> torch.Tensor:
        return x.gather(1, ids)

    n = pick(counts).clamp_min(1).to(torch.float64)
    boxes = torch.stack([pick(y0) / h, pick(x0) / w, (pick(y1) + 1) / h, (pick(x1) + 1) / w], dim=-1)
    centers = torch.stack([(pick(sum_y) / n + 0.5) / h, (pick(sum_x) / n + 0.5) / w], dim=-1)
    boxes = torch.where(ok[..., None], boxes.to(torch.float32), torch.full_like(boxes, -1.0, dtype=torch.float32))
    centers = torch.where(ok[..., None], centers.to(torch.float32),
                          torch.full_like(centers, -1.0, dtype=torch.float32))
    if take < k:
        pad = k - take
        boxes = torch.cat([boxes, boxes.new_full((b, pad, 4), -1.0)], dim=1)
        centers = torch.cat([centers, centers.new_full((b, pad, 2), -1.0)], dim=1)
        ok = torch.cat([ok, ok.new_zeros(b, pad)], dim=1)
    return boxes, centers, ok
