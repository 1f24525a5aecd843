"""TorchRL adapters: :class:`LociSTransform` and slot-set actor / value builders.

:class:`LociSTransform` turns image observations into slot features inside a ``TransformedEnv``.
Its recurrent state travels in the tensordict under ``state_key`` (default ``"locis"``, a nested
TensorDict with the model's state entries), registered in both the observation and the state
specs as a ``TensorDictPrimer`` does. It therefore survives ``ParallelEnv`` / ``SerialEnv``, step_mdp,
collectors and replay buffers. Mind its size: about ``K * 5 + 4`` image planes of ``S x S`` floats per
row and step (tiny preset: ~0.65 MB); exclude ``state_key`` from replay-buffer storage if you do not
need it (e.g. ``ExcludeTransform("locis")`` on the buffer).

Reset (``_reset``): only the rows flagged by ``"_reset"`` get a fresh state (next episode of their
seed stream) and a first model step on their reset frame; other rows keep state and features (TorchRL
merges them back from the input tensordict). Step (``_step``): the previous state is read from the
root of the input tensordict, one batched model step runs over all rows, and the new state and
features go to ``"next"``. Put the transform on the outer batched env
(``TransformedEnv(ParallelEnv(n, make_env), LociSTransform(model))``) so that one model step serves
all workers.

Inputs: ``rgb_key`` (default: ``"rgb"`` if the env has it, else ``"pixels"``), uint8 ``[*B, H, W, 3]``
or float ``[*B, 3, H, W]`` in [0, 1], resized to the model's input if needed; ``depth_key``
(``"depth"``) metric ``[*B, H, W, 1]``, read only when the model uses depth.

Outputs (``out_keys``, float32): ``slot_gestalt [*B, K, G]``, ``slot_position [*B, K, 4]``,
``slot_depth [*B, K, 1]``, ``slot_presence [*B, K]``.

Example:
    >>> from torchrl.envs import GymEnv, SerialEnv, TransformedEnv
    >>> env = TransformedEnv(SerialEnv(2, lambda: GymEnv("locis/PushObjects-v0")),
    ...                      LociSTransform(LociS("tiny"), device="cpu"))
    >>> td = env.reset()
    >>> td["slot_gestalt"].shape
    torch.Size([2, 6, 96])
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from tensordict import TensorDictBase
from tensordict.nn import NormalParamExtractor, TensorDictModule
from torch import nn
from torchrl.data import Bounded, Composite, Unbounded
from torchrl.envs import Transform
from torchrl.modules import ProbabilisticActor, TanhNormal, ValueOperator

from .perception import SlotPerception
from .slot_set import SlotSetEncoder

__all__ = ["LociSTransform", "SlotSetEncoder", "SlotSetHead", "make_slot_actor", "make_slot_value",
           "DEFAULT_OUT_KEYS"]

DEFAULT_OUT_KEYS = ("slot_gestalt", "slot_position", "slot_depth", "slot_presence")
_RGB_KEYS = ("rgb", "pixels")


class LociSTransform(Transform):
    """Recurrent Loci-s perception as a TorchRL transform (see the module docstring).

    Args:
        model: a ``LociS`` instance, a packaged name (``"default"``: RGB; ``"depth"``: RGB + depth
            input, needs depth frames) or a checkpoint path.
        rgb_key: key of the frames (None: ``"rgb"`` if present in the spec, else ``"pixels"``).
        depth_key: key of metric depth, used when the model has ``use_depth``.
        out_keys: the four feature keys (gestalt, position, depth, presence).
        state_key: key of the nested recurrent state.
        device: model device (``"auto"``: CUDA if available); features are returned on the env's
            device.
        mode: slot-assignment mode for the model.
        seed: base seed of the per-row slot seed streams (row ``i``: ``seed + i``); None: entropy.
        num_slots, model_overrides: for a model given by name / path: inference-time config changes
            (as :class:`~locis_rl.rl.LociSWrapper`); the specs have the effective ``K``.
    """

    def __init__(self, model: Any = "default", *, rgb_key: str | None = None, depth_key: str = "depth",
                 out_keys: Sequence[str] = DEFAULT_OUT_KEYS, state_key: str = "locis",
                 device: str | torch.device = "auto", mode: str | None = "seg", seed: int | None = None,
                 num_slots: int | None = None, model_overrides: Mapping[str, Any] | None = None):
        if len(out_keys) != 4:
            raise ValueError(f"out_keys: expected 4 keys (gestalt, position, depth, presence), actual "
                             f"value: {out_keys!r}")
        super().__init__(in_keys=[rgb_key or _RGB_KEYS[0]], out_keys=list(out_keys))
        self.perception = SlotPerception(model, num_envs=1, device=device, mode=mode, seed=seed,
                                         num_slots=num_slots, model_overrides=model_overrides)
        self._seed = seed
        self._rgb_key_given = rgb_key is not None
        self.rgb_key = rgb_key or _RGB_KEYS[0]
        self.depth_key = depth_key
        self.state_key = state_key
        self.feature_keys = list(out_keys)

    # ---- specs -----------------------------------------------------------------------------
    def _resolve_rgb_key(self, observation_spec: Composite) -> None:
        keys = set(observation_spec.keys())
        if not self._rgb_key_given:
            found = next((k for k in _RGB_KEYS if k in keys), None)
            if found is None:
                raise KeyError(f"LociSTransform: no image key in the observation spec (looked for "
                               f"{_RGB_KEYS}, found {sorted(map(str, keys))}); pass rgb_key=... or make "
                               "the env render pixels (e.g. GymEnv(..., from_pixels=True))")
            self.rgb_key = found
            self.in_keys = [found]
        elif self.rgb_key not in keys:
            raise KeyError(f"LociSTransform: rgb_key={self.rgb_key!r} not in the observation spec "
                           f"{sorted(map(str, keys))}")
        spec = observation_spec[self.rgb_key]
        shape = spec.shape[len(observation_spec.shape):]
        channels = shape[-1] if (len(shape) == 3 and (shape[-1] <= 4 or spec.dtype == torch.uint8)) \
            else (shape[0] if len(shape) == 3 else None)
        if channels != 3:
            raise ValueError(f"LociSTransform: expected RGB frames (H, W, 3) or (3, H, W) at "
                             f"{self.rgb_key!r}, actual spec shape: {tuple(shape)}")
        if self.perception.use_depth and self.depth_key not in keys:
            raise ValueError(f"LociSTransform: the model uses depth (config.use_depth=True) but the "
                             f"env has no {self.depth_key!r} observation; use an env with depth or a "
                             "model trained without it")

    def _state_spec(self, batch: torch.Size, device: Any) -> Composite:
        template = self.perception.model.init_state(1, self.perception.device, seed=0)

        def build(td: TensorDictBase) -> Composite:
            entries = {}
            for key, value in td.items():
                if isinstance(value, TensorDictBase):
                    entries[key] = build(value)
                else:
                    entries[key] = Unbounded(shape=(*batch, *value.shape[1:]), dtype=value.dtype,
                                             device=device)
            return Composite(entries, shape=batch, device=device)

        return build(template)

    def transform_observation_spec(self, observation_spec: Composite) -> Composite:
        self._resolve_rgb_key(observation_spec)
        batch, device = observation_spec.shape, observation_spec.device
        k, g = self.perception.num_slots, self.perception.gestalt_dim
        gk, pk, dk, prk = self.feature_keys
        observation_spec[gk] = Unbounded(shape=(*batch, k, g), dtype=torch.float32, device=device)
        observation_spec[pk] = Unbounded(shape=(*batch, k, 4), dtype=torch.float32, device=device)
        observation_spec[dk] = Unbounded(shape=(*batch, k, 1), dtype=torch.float32, device=device)
        observation_spec[prk] = Bounded(0.0, 1.0, shape=(*batch, k), dtype=torch.float32, device=device)
        observation_spec[self.state_key] = self._state_spec(batch, device)
        return observation_spec

    def transform_input_spec(self, input_spec: Composite) -> Composite:
        # The state is also an input of the next step (like a TensorDictPrimer's entries), so that
        # batched envs and `TransformedEnv._reset` pass it along.
        input_spec = input_spec.clone()
        state_spec = input_spec["full_state_spec"]
        if state_spec is None:
            state_spec = Composite(shape=input_spec.shape, device=input_spec.device)
        state_spec[self.state_key] = self._state_spec(input_spec.shape, input_spec.device)
        input_spec["full_state_spec"] = state_spec
        return input_spec

    # ---- data path -------------------------------------------------------------------------
    def _inputs(self, td: TensorDictBase, batch: torch.Size) -> tuple[torch.Tensor, torch.Tensor | None]:
        frames = td.get(self.rgb_key, None)
        if frames is None and not self._rgb_key_given:  # specs not built yet: pick the key here
            self.rgb_key = next((k for k in _RGB_KEYS if k in td.keys()), self.rgb_key)
            self.in_keys = [self.rgb_key]
            frames = td.get(self.rgb_key, None)
        if frames is None:
            raise KeyError(f"LociSTransform: no frames at {self.rgb_key!r}; keys: "
                           f"{sorted(map(str, td.keys()))}. Pass rgb_key=... or make the env render "
                           "pixels (e.g. GymEnv(..., from_pixels=True))")
        frames = frames.reshape(-1, *frames.shape[len(batch):])
        depth = None
        if self.perception.use_depth:
            depth = td.get(self.depth_key)
            depth = depth.reshape(-1, *depth.shape[len(batch):])
        return frames, depth

    def _rows(self, n: int) -> None:
        if self.perception.num_envs != n:  # first reset: one seed stream per (flattened) env row
            self.perception = SlotPerception(self.perception.model, num_envs=n,
                                             device=self.perception.device, mode=self.perception.mode,
                                             seed=self._seed)

    def _write(self, td: TensorDictBase, batch: torch.Size, features: dict, state: TensorDictBase) -> None:
        device = td.device
        for key, name in zip(self.feature_keys, ("gestalt", "position", "depth", "presence")):
            value = features[name]
            td.set(key, value.reshape(*batch, *value.shape[1:]).to(device))
        td.set(self.state_key, state.reshape(*batch).to(device) if device is not None
               else state.reshape(*batch))

    def _reset(self, tensordict: TensorDictBase, tensordict_reset: TensorDictBase) -> TensorDictBase:
        batch = tensordict_reset.batch_size
        n = int(np.prod(batch)) if len(batch) else 1
        self._rows(n)
        reset = tensordict.get("_reset", None) if tensordict is not None else None
        if reset is None:
            rows = torch.ones(n, dtype=torch.bool)
        else:
            rows = reset.reshape(n, -1).any(-1).cpu()
        frames, depth = self._inputs(tensordict_reset, batch)
        p = self.perception
        idx = rows.nonzero().squeeze(1)
        k, g = p.num_slots, p.gestalt_dim
        with torch.no_grad():
            if len(idx):
                fresh = p.initial_state(p.next_seeds(idx.numpy()))
                rgb, d = p.preprocess(frames[idx.to(frames.device)],
                                      None if depth is None else depth[idx.to(depth.device)])
                feats, _, fresh = p.run(rgb, d, fresh)
            else:  # nothing flagged: keep every row
                fresh = None
                feats = {"gestalt": torch.zeros(0, k, g), "position": torch.zeros(0, k, 4),
                         "depth": torch.zeros(0, k, 1), "presence": torch.zeros(0, k)}
            if len(idx) == n:
                self._write(tensordict_reset, batch, feats, fresh)
                return tensordict_reset
            # Partial reset: rows not flagged keep their previous state (when the input carries it;
            # TorchRL restores those rows from the input tensordict anyway).
            prev = tensordict.get(self.state_key, None)
            if prev is not None:
                state = prev.reshape(n).to(p.device).clone()
            else:
                state = p.model.init_state(n, p.device, seed=0)
            idx_d = idx.to(p.device)
            if fresh is not None:
                state[idx_d] = fresh
            full = {}
            for name, value in feats.items():
                value = value.to(p.device)
                buf = torch.zeros(n, *value.shape[1:], dtype=value.dtype, device=p.device)
                buf[idx_d] = value
                full[name] = buf
            self._write(tensordict_reset, batch, full, state)
        return tensordict_reset

    def _step(self, tensordict: TensorDictBase, next_tensordict: TensorDictBase) -> TensorDictBase:
        batch = next_tensordict.batch_size
        n = int(np.prod(batch)) if len(batch) else 1
        state = tensordict.get(self.state_key, None)
        if state is None:
            raise KeyError(f"LociSTransform: no slot state at {self.state_key!r} in the input "
                           "tensordict; call env.reset() first and step with the tensordict it returns")
        frames, depth = self._inputs(next_tensordict, batch)
        p = self.perception
        with torch.no_grad():
            rgb, d = p.preprocess(frames, depth)
            feats, _, state = p.run(rgb, d, state.reshape(n).to(p.device))
        self._write(next_tensordict, batch, feats, state)
        return next_tensordict

    def _call(self, next_tensordict: TensorDictBase) -> TensorDictBase:  # pragma: no cover
        raise RuntimeError("LociSTransform is recurrent: it runs inside a TransformedEnv "
                           "(reset / step), not on isolated tensordicts")

    forward = _call


class SlotSetHead(nn.Module):
    """:class:`SlotSetEncoder` followed by a linear layer: four feature tensors -> ``[*, out_dim]``."""

    def __init__(self, gestalt_dim: int, out_dim: int, features_dim: int = 128, hidden: int = 64):
        super().__init__()
        self.encoder = SlotSetEncoder(gestalt_dim, features_dim=features_dim, hidden=hidden)
        self.head = nn.Linear(features_dim, out_dim)

    def forward(self, gestalt, position, depth, presence) -> torch.Tensor:
        return self.head(self.encoder(gestalt, position, depth, presence))


class _LocScale(nn.Module):
    def __init__(self, body: nn.Module):
        super().__init__()
        self.body = body
        self.split = NormalParamExtractor()

    def forward(self, *features):
        return self.split(self.body(*features))


def _gestalt_dim(env: Any, feature_keys: Sequence[str]) -> int:
    return int(env.observation_spec[feature_keys[0]].shape[-1])


def make_slot_actor(env: Any, *, feature_keys: Sequence[str] = DEFAULT_OUT_KEYS, features_dim: int = 128,
                    hidden: int = 64) -> ProbabilisticActor:
    """A ``TanhNormal`` actor for continuous (``Bounded``) actions over the slot features of ``env``."""
    spec = getattr(env, "action_spec_unbatched", None) or env.action_spec
    act_dim = int(spec.shape[-1])
    low = spec.space.low.reshape(-1, act_dim)[0]
    high = spec.space.high.reshape(-1, act_dim)[0]
    body = SlotSetHead(_gestalt_dim(env, feature_keys), 2 * act_dim, features_dim, hidden)
    module = TensorDictModule(_LocScale(body), in_keys=list(feature_keys), out_keys=["loc", "scale"])
    return ProbabilisticActor(module, in_keys=["loc", "scale"], spec=env.action_spec,
                              distribution_class=TanhNormal,
                              distribution_kwargs={"low": low, "high": high}, return_log_prob=True)


def make_slot_value(env: Any, *, feature_keys: Sequence[str] = DEFAULT_OUT_KEYS, features_dim: int = 128,
                    hidden: int = 64) -> ValueOperator:
    """A state-value network (``"state_value"``) over the slot features of ``env``."""
    body = SlotSetHead(_gestalt_dim(env, feature_keys), 1, features_dim, hidden)
    return ValueOperator(body, in_keys=list(feature_keys))
