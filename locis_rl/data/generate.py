"""Record videos (rgb, and for MuJoCo-based envs metric depth + instance segmentation) to HDF5.

Usage::

    python -m locis_rl.data.generate --env HalfCheetah-v5 --episodes 100 --frames 24 \\
        --out data/cheetah.h5 [--env-kwargs k=v ...] [--seed 0] [--workers 2] \\
        [--policy random|noop] [--image-size 64 | --image-size H W] [--seg-level root|body]

Env ids
-------
* any registered Gymnasium id (``locis/MultiObject-v0`` and ``locis/PushObjects-v0`` are
  registered by ``import envs``, which ``import locis_rl`` does), including ``module:Id``;
* ``dmc:DOMAIN-TASK`` for a dm_control suite task, e.g. ``dmc:cartpole-balance``,
  ``dmc:ball_in_cup-catch`` (the domain is everything before the first ``-``). It is wrapped in a
  minimal Gymnasium adapter (:class:`DMControlEnv`) that renders camera 0 (free camera -1 when the
  model has no camera); ``--env-kwargs`` go to ``suite.load(task_kwargs=...)`` (e.g.
  ``time_limit=...``), except the adapter's own ``camera_id``, ``width`` and ``height``.

Where the frames come from
--------------------------
1. The env labels its own frames (``info["segmentation"]`` present after reset, as in our scenes):
   rgb = ``obs["rgb"]``, depth = ``obs["depth"]``, segmentation = ``info["segmentation"]``.
2. Otherwise, the env exposes a MuJoCo model and data (``env.unwrapped.model/.data``, or a
   dm_control ``physics``): rgb, depth and segmentation are all rendered by our own
   ``mujoco.Renderer`` with the same camera as the env's ``render()`` (see
   :mod:`locis_rl.data.mujoco_labels`), so the three are pixel-aligned by construction and rgb
   equals what ``env.render()`` shows (checked in tests for gymnasium's MuJoCo envs).
3. Otherwise rgb only: the observation itself when it is an ``(H, W, 3)`` uint8 image (or a Dict
   with an ``"rgb"`` entry), else ``env.render()`` in ``rgb_array`` mode.

Frames not already at ``--image-size`` are resized (rgb bilinear, depth/segmentation nearest).
For gymnasium MuJoCo envs (and envs whose constructor takes ``width``/``height`` or
``image_size``) the size is passed to ``make`` as well.

Episodes, seeding, early ends
-----------------------------
Every episode has exactly ``--frames`` T frames: frame 0 is the observation after ``reset``,
frames 1..T-1 follow one ``step`` each. Episode ``i`` resets with seed ``S + i`` and seeds the
action space with the same value, so the file does not depend on ``--workers``. If the env
terminates or truncates before T frames, the partial episode is discarded and re-rolled with the
derived seed ``SeedSequence([S + i, attempt]).generate_state(1)[0]`` (attempt = 1, 2, ...; at
most 20 attempts, then an error). The seed that produced each stored episode is kept in
``episode_seeds``. ``--policy noop`` plays zeros (clipped into a Box, ``start`` of (Multi)Discrete).

HDF5 layout (``format="locis-rl-video"``, ``format_version=1``)
----------------------------------------------------------------
Datasets (N = episodes, T = frames, chunked one episode per chunk, lzf-compressed):

* ``rgb``           uint8   (N, T, H, W, 3)
* ``depth``         float32 (N, T, H, W, 1)  raw metric depth (only if ``has_depth``)
* ``segmentation``  uint8/uint16/int32 (N, T, H, W)  0 = background, 1..K object ids stable over
  the episode (only if ``has_segmentation``)
* ``actions``       (N, T-1, *action_shape)  ``actions[:, t]`` is applied after frame t
  (float32 for Box, int64 for discrete spaces; absent for other spaces)
* ``rewards``       float32 (N, T-1)  reward of that step
* ``episode_seeds`` int64 (N,) reset seed actually used; ``rerolls`` int32 (N,)

Attributes: ``format``, ``format_version``, ``env_id``, ``env_kwargs`` (JSON), ``seed``,
``frames``, ``episodes``, ``image_size`` ([H, W]), ``created_with`` (``locis-rl <version>``),
``has_depth``, ``has_segmentation``, ``policy``, ``rgb_source`` (``obs`` / ``render`` /
``mujoco``), ``segmentation_source`` (``env`` / ``mujoco`` / ``none``), ``segmentation_level``,
``object_names`` (JSON list, name of object id k at k-1, when known), ``depth_units``.

The file is written to a temporary name in the destination directory and moved into place with
``os.replace`` only when complete; an interrupted run leaves no file at ``--out``.
"""
from __future__ import annotations

import os

if not os.environ.get("DISPLAY"):
    os.environ.setdefault("MUJOCO_GL", "egl")  # before mujoco is imported, here and in spawned workers

import argparse  # noqa: E402
import ast  # noqa: E402
import inspect  # noqa: E402
import json  # noqa: E402
import multiprocessing as mp  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict, dataclass, field  # noqa: E402
from typing import Any, Sequence  # noqa: E402

import numpy as np  # noqa: E402

FORMAT = "locis-rl-video"
FORMAT_VERSION = 1
MAX_ATTEMPTS = 20


# --------------------------------------------------------------------------------------------
# argument helpers
# --------------------------------------------------------------------------------------------
def parse_value(text: str) -> Any:
    """Python literal (int, float, bool, None, tuple, list, dict, quoted str) or the plain string."""
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_kwargs(items: Sequence[str] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"env kwarg {item!r} is not of the form key=value")
        out[key.strip()] = parse_value(value)
    return out


def _size(image_size: int | Sequence[int] | None) -> tuple[int, int] | None:
    if image_size is None:
        return None
    if isinstance(image_size, (int, np.integer)):
        return int(image_size), int(image_size)
    s = [int(v) for v in image_size]
    if len(s) == 1:
        return s[0], s[0]
    if len(s) != 2:
        raise ValueError(f"image size must be one or two ints (H W), got {image_size!r}")
    return s[0], s[1]


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, (np.ndarray, tuple)):
        return list(o)
    return repr(o)


# --------------------------------------------------------------------------------------------
# dm_control adapter
# --------------------------------------------------------------------------------------------
def _dmc_env_cls():
    import gymnasium as gym

    class DMControlEnv(gym.Env):
        """Minimal Gymnasium view of a dm_control suite task (``model``/``data`` are raw MuJoCo)."""

        metadata = {"render_modes": ["rgb_array"]}

        def __init__(self, domain: str, task: str, width: int = 64, height: int = 64,
                     camera_id: int | None = None, render_mode: str | None = "rgb_array", **task_kwargs: Any):
            from dm_control import suite

            self._env = suite.load(domain, task, task_kwargs=task_kwargs or None)
            self.physics = self._env.physics
            spec = self._env.action_spec()
            self.action_space = gym.spaces.Box(np.asarray(spec.minimum, np.float32) * np.ones(spec.shape, np.float32),
                                               np.asarray(spec.maximum, np.float32) * np.ones(spec.shape, np.float32),
                                               dtype=np.float32)
            dim = sum(int(np.prod(v.shape)) for v in self._env.observation_spec().values())
            self.observation_space = gym.spaces.Box(-np.inf, np.inf, (dim,), np.float64)
            self.width, self.height, self.render_mode = int(width), int(height), render_mode
            self.render_camera = camera_id if camera_id is not None else (0 if self.model.ncam > 0 else -1)

        @property
        def model(self):
            return self.physics.model.ptr

        @property
        def data(self):
            return self.physics.data.ptr

        @staticmethod
        def _flat(obs: dict) -> np.ndarray:
            return np.concatenate([np.asarray(v, np.float64).ravel() for v in obs.values()]) if obs else np.zeros(0)

        def reset(self, *, seed: int | None = None, options: dict | None = None):
            super().reset(seed=seed)
            if seed is not None:
                self._env.task._random = np.random.RandomState(seed)
            ts = self._env.reset()
            return self._flat(ts.observation), {}

        def step(self, action):
            ts = self._env.step(action)
            return self._flat(ts.observation), float(ts.reward or 0.0), False, bool(ts.last()), {}

        def render(self):
            return self.physics.render(self.height, self.width, camera_id=self.render_camera)

    return DMControlEnv


# --------------------------------------------------------------------------------------------
# env construction and frame capture
# --------------------------------------------------------------------------------------------
def make_env(env_id: str, env_kwargs: dict[str, Any] | None = None, image_size: Any = 64):
    """Create the env, passing the frame size / render mode where the constructor takes them."""
    import gymnasium as gym

    kw = dict(env_kwargs or {})
    hw = _size(image_size)
    if env_id.startswith("dmc:"):
        domain, _, task = env_id[4:].partition("-")
        if not domain or not task:
            raise ValueError(f"dm_control env id must be dmc:DOMAIN-TASK, got {env_id!r}")
        try:
            cls = _dmc_env_cls()
        except ImportError as e:  # pragma: no cover
            raise RuntimeError(f"{env_id}: dm_control is not importable ({e})") from e
        if hw:
            kw.setdefault("height", hw[0])
            kw.setdefault("width", hw[1])
        return cls(domain, task, **kw)

    import envs  # noqa: F401  (registers locis/... ids)

    spec = gym.spec(env_id)
    creator = spec.entry_point
    if isinstance(creator, str):
        from gymnasium.envs.registration import load_env_creator

        creator = load_env_creator(creator)
    params: set[str] = set()
    try:
        params = set(inspect.signature(creator).parameters)
    except (TypeError, ValueError):
        pass
    is_gym_mujoco = False
    try:
        from gymnasium.envs.mujoco.mujoco_env import MujocoEnv

        is_gym_mujoco = inspect.isclass(creator) and issubclass(creator, MujocoEnv)
    except Exception:  # gymnasium[mujoco] not importable
        pass
    if hw:
        if is_gym_mujoco or {"width", "height"} <= params:
            kw.setdefault("height", hw[0])
            kw.setdefault("width", hw[1])
        elif "image_size" in params:
            kw.setdefault("image_size", hw[0] if hw[0] == hw[1] else hw)
    modes = (getattr(creator, "metadata", None) or {}).get("render_modes", [])
    if "rgb_array" in modes or is_gym_mujoco:
        kw.setdefault("render_mode", "rgb_array")
    return gym.make(env_id, **kw)


def _resize_rgb(img: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    if img.shape[:2] == hw:
        return img
    from PIL import Image

    return np.asarray(Image.fromarray(img).resize((hw[1], hw[0]), Image.BILINEAR))


def _resize_nearest(img: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    h, w = img.shape[:2]
    if (h, w) == hw:
        return img
    rows = np.minimum((np.arange(hw[0]) + 0.5) * h / hw[0], h - 1).astype(np.int64)
    cols = np.minimum((np.arange(hw[1]) + 0.5) * w / hw[1], w - 1).astype(np.int64)
    return img[rows][:, cols]


def _image_from_obs(obs: Any) -> np.ndarray | None:
    if isinstance(obs, dict) and "rgb" in obs:
        return np.asarray(obs["rgb"])
    if isinstance(obs, np.ndarray) and obs.dtype == np.uint8 and obs.ndim == 3 and obs.shape[-1] == 3:
        return obs
    return None


@dataclass
class SourceInfo:
    has_depth: bool = False
    has_segmentation: bool = False
    segmentation_source: str = "none"  # env | mujoco | none
    rgb_source: str = "render"  # obs | render | mujoco
    object_names: list[str] = field(default_factory=list)


class FrameSource:
    """Wraps an env and turns reset/step into aligned frame dicts (rgb, [depth, segmentation])."""

    def __init__(self, env_id: str, env_kwargs: dict[str, Any] | None, image_size: Any = 64, seg_level: str = "root"):
        self.env = make_env(env_id, env_kwargs, image_size)
        self.hw = _size(image_size)
        self.seg_level = seg_level
        self.action_space = self.env.action_space
        self.info: SourceInfo | None = None
        self._renderer = None

    # -- capture ---------------------------------------------------------------------------
    def _setup(self, obs: Any, info: dict) -> None:
        from locis_rl.data.mujoco_labels import MujocoLabelRenderer, mujoco_handles

        si = SourceInfo()
        if "segmentation" in info:
            si.has_segmentation, si.segmentation_source = True, "env"
            si.has_depth = isinstance(obs, dict) and "depth" in obs
            si.rgb_source = "obs" if _image_from_obs(obs) is not None else "render"
            names = getattr(self.env.unwrapped, "object_names", None)
            si.object_names = list(names) if names is not None else []
        else:
            handles = mujoco_handles(self.env)
            if handles is not None:
                model, data = handles
                if self.hw is None:
                    img = _image_from_obs(obs)
                    img = img if img is not None else self.env.render()
                    self.hw = tuple(img.shape[:2])
                self._renderer = MujocoLabelRenderer(model, data, self.hw[0], self.hw[1], self.seg_level)
                si.has_depth = si.has_segmentation = True
                si.segmentation_source, si.rgb_source = "mujoco", "mujoco"
                si.object_names = list(self._renderer.object_names)
            else:
                si.rgb_source = "obs" if _image_from_obs(obs) is not None else "render"
        self.info = si

    def _capture(self, obs: Any, info: dict) -> dict[str, np.ndarray]:
        si = self.info
        assert si is not None
        if si.rgb_source == "mujoco":
            frame = self._renderer.render()
            return frame
        if si.rgb_source == "obs":
            rgb = _image_from_obs(obs)
        else:
            rgb = self.env.render()
            if rgb is None:
                raise RuntimeError("env.render() returned None; the env needs render_mode='rgb_array'")
        rgb = np.asarray(rgb)
        if rgb.dtype != np.uint8:
            rgb = np.clip(rgb * (255.0 if rgb.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
        rgb = rgb[..., :3]
        if self.hw is None:
            self.hw = tuple(rgb.shape[:2])
        frame = {"rgb": np.ascontiguousarray(_resize_rgb(rgb, self.hw))}
        if si.has_depth:
            d = np.asarray(obs["depth"], dtype=np.float32)
            d = d[..., None] if d.ndim == 2 else d
            frame["depth"] = np.ascontiguousarray(_resize_nearest(d, self.hw))
        if si.has_segmentation:
            if "segmentation" not in info:
                raise RuntimeError("env gave info['segmentation'] after reset but not after step")
            s = np.asarray(info["segmentation"])
            s = s[..., 0] if s.ndim == 3 else s
            frame["segmentation"] = np.ascontiguousarray(_resize_nearest(s, self.hw).astype(np.int32))
        return frame

    def reset(self, seed: int) -> dict[str, np.ndarray]:
        obs, info = self.env.reset(seed=int(seed))
        self.action_space.seed(int(seed))
        if self.info is None:
            self._setup(obs, info)
        if self._renderer is not None:
            from locis_rl.data.mujoco_labels import camera_for_env

            self._renderer.camera = camera_for_env(self.env, self._renderer.model, self._renderer.data)
        return self._capture(obs, info)

    def step(self, action: Any) -> tuple[dict[str, np.ndarray], float, bool, bool]:
        obs, reward, terminated, truncated, info = self.env.step(action)
        return self._capture(obs, info), float(reward), bool(terminated), bool(truncated)

    def close(self) -> None:
        if self._renderer is not None:
            self._renderer.close()
            self._renderer = None
        self.env.close()


# --------------------------------------------------------------------------------------------
# policies and episodes
# --------------------------------------------------------------------------------------------
def noop_action(space: Any) -> Any:
    from gymnasium import spaces

    if isinstance(space, spaces.Box):
        return np.clip(np.zeros(space.shape), space.low, space.high).astype(space.dtype)
    if isinstance(space, spaces.Discrete):
        return np.int64(space.start)
    if isinstance(space, spaces.MultiDiscrete):
        return np.asarray(space.start).copy()
    if isinstance(space, spaces.MultiBinary):
        return np.zeros(space.shape, dtype=space.dtype)
    return space.sample()


def _storable_action(space: Any) -> tuple[tuple[int, ...], Any] | None:
    from gymnasium import spaces

    if isinstance(space, spaces.Box):
        return tuple(space.shape), np.float32
    if isinstance(space, (spaces.Discrete, spaces.MultiDiscrete, spaces.MultiBinary)):
        return tuple(space.shape), np.int64
    return None


def episode_seed(base: int, index: int, attempt: int) -> int:
    if attempt == 0:
        return int(base) + int(index)
    return int(np.random.SeedSequence([int(base) + int(index), int(attempt)]).generate_state(1)[0])


def record_episode(source: FrameSource, index: int, seed: int, frames: int, policy: str = "random") -> dict[str, Any]:
    for attempt in range(MAX_ATTEMPTS):
        s = episode_seed(seed, index, attempt)
        buf = [source.reset(s)]
        actions, rewards, ok = [], [], True
        for t in range(frames - 1):
            a = source.action_space.sample() if policy == "random" else noop_action(source.action_space)
            frame, r, term, trunc = source.step(a)
            buf.append(frame)
            actions.append(np.asarray(a))
            rewards.append(r)
            if (term or trunc) and t < frames - 2:
                ok = False
                break
        if ok:
            out: dict[str, Any] = {k: np.stack([f[k] for f in buf]) for k in buf[0]}
            store = _storable_action(source.action_space)
            if store is not None:
                shape, dt = store
                out["actions"] = np.asarray(actions, dtype=dt).reshape((frames - 1,) + shape)
            out["rewards"] = np.asarray(rewards, dtype=np.float32)
            out["episode_seed"] = s
            out["rerolls"] = attempt
            out["source_info"] = asdict(source.info)
            return out
    raise RuntimeError(
        f"episode {index}: the env ended before {frames} frames in {MAX_ATTEMPTS} attempts; "
        "record fewer --frames (or raise the env's max_episode_steps)")


# --------------------------------------------------------------------------------------------
# workers
# --------------------------------------------------------------------------------------------
_WORKER: dict[str, Any] = {}


def _worker_init(cfg: dict[str, Any], in_pool: bool = False) -> None:
    _WORKER["cfg"] = cfg
    _WORKER["source"] = FrameSource(cfg["env_id"], cfg["env_kwargs"], cfg["image_size"], cfg["seg_level"])
    if in_pool:  # pool workers close renderer and env when they exit (pool.close + join)
        from multiprocessing.util import Finalize

        Finalize(None, _worker_close, exitpriority=10)


def _worker_close() -> None:
    src = _WORKER.pop("source", None)
    if src is not None:
        try:
            src.close()
        except Exception:
            pass


def _worker_episode(index: int) -> tuple[int, dict[str, Any]]:
    cfg = _WORKER["cfg"]
    return index, record_episode(_WORKER["source"], index, cfg["seed"], cfg["frames"], cfg["policy"])


# --------------------------------------------------------------------------------------------
# writer
# --------------------------------------------------------------------------------------------
class _Writer:
    def __init__(self, f: Any, attrs: dict[str, Any], episodes: int, frames: int):
        self.f, self.attrs, self.n, self.t = f, attrs, episodes, frames
        self.created = False

    def _create(self, ep: dict[str, Any]) -> None:
        f = self.f
        for name in ("rgb", "depth", "segmentation", "actions", "rewards"):
            if name not in ep:
                continue
            arr = ep[name]
            shape = (self.n,) + arr.shape
            chunk = (1,) + arr.shape
            per_frame = max(1, int(np.prod(arr.shape[1:])) * arr.dtype.itemsize)
            if arr.ndim >= 1 and per_frame * arr.shape[0] > (16 << 20):  # keep chunks <= 16 MiB
                chunk = (1, max(1, (16 << 20) // per_frame)) + arr.shape[1:]
            f.create_dataset(name, shape=shape, dtype=arr.dtype, chunks=chunk, compression="lzf")
        f.create_dataset("episode_seeds", shape=(self.n,), dtype=np.int64)
        f.create_dataset("rerolls", shape=(self.n,), dtype=np.int32)
        si = ep["source_info"]
        H, W = ep["rgb"].shape[1:3]
        attrs = dict(self.attrs)
        attrs.update(
            image_size=np.asarray([H, W], dtype=np.int64),
            has_depth="depth" in ep,
            has_segmentation="segmentation" in ep,
            segmentation_source=si["segmentation_source"],
            rgb_source=si["rgb_source"],
            object_names=json.dumps(si["object_names"]),
            depth_units="model length units (metres), distance along the optical axis" if "depth" in ep else "",
        )
        for k, v in attrs.items():
            f.attrs[k] = v
        self.created = True

    def write(self, index: int, ep: dict[str, Any]) -> None:
        if not self.created:
            self._create(ep)
        for name in ("rgb", "depth", "segmentation", "actions", "rewards"):
            if name in ep:
                if name not in self.f:
                    raise RuntimeError(f"episode {index} has {name!r} but the first episode did not")
                self.f[name][index] = ep[name]
        self.f["episode_seeds"][index] = ep["episode_seed"]
        self.f["rerolls"][index] = ep["rerolls"]


def generate(env_id: str, episodes: int, frames: int, out: str | os.PathLike, *,
             env_kwargs: dict[str, Any] | None = None, seed: int = 0, workers: int = 1,
             policy: str = "random", image_size: Any = 64, seg_level: str = "root",
             progress: bool = True) -> str:
    """Record ``episodes`` x ``frames`` frames of ``env_id`` into the HDF5 file ``out`` (see module doc)."""
    import h5py
    from tqdm import tqdm

    from locis_rl import __version__

    if episodes < 1 or frames < 1:
        raise ValueError("episodes and frames must be >= 1")
    if policy not in ("random", "noop"):
        raise ValueError(f"unknown policy {policy!r}; use random or noop")
    out = os.path.abspath(os.fspath(out))
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.{os.getpid()}.tmp")
    env_kwargs = dict(env_kwargs or {})
    cfg = dict(env_id=env_id, env_kwargs=env_kwargs, image_size=image_size, seg_level=seg_level,
               seed=int(seed), frames=int(frames), policy=policy)
    attrs = dict(format=FORMAT, format_version=FORMAT_VERSION, env_id=env_id,
                 env_kwargs=json.dumps(env_kwargs, default=_json_default), seed=int(seed), frames=int(frames),
                 episodes=int(episodes), created_with=f"locis-rl {__version__}", policy=policy,
                 segmentation_level=seg_level)
    workers = max(1, min(int(workers), episodes))
    bar = tqdm(total=episodes * frames, unit="frame", desc=f"{env_id} -> {os.path.basename(out)}",
               disable=not progress, dynamic_ncols=True)
    f = h5py.File(tmp, "w")
    try:
        writer = _Writer(f, attrs, episodes, frames)
        if workers == 1:
            _worker_init(cfg)
            try:
                for i in range(episodes):
                    writer.write(*_worker_episode(i))
                    bar.update(frames)
            finally:
                _worker_close()
        else:
            ctx = mp.get_context("spawn")
            with ctx.Pool(workers, initializer=_worker_init, initargs=(cfg, True)) as pool:
                for i, ep in pool.imap_unordered(_worker_episode, range(episodes)):
                    writer.write(i, ep)
                    bar.update(frames)
                pool.close()
                pool.join()
        f.close()
        os.replace(tmp, out)
    except BaseException:
        try:
            f.close()
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        raise
    finally:
        bar.close()
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m locis_rl.data.generate", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--env", required=True, help="Gymnasium id, module:Id, or dmc:DOMAIN-TASK")
    p.add_argument("--env-kwargs", nargs="*", default=[], metavar="K=V",
                   help="constructor kwargs; values parsed as Python literals, else strings")
    p.add_argument("--episodes", type=int, required=True)
    p.add_argument("--frames", type=int, required=True, help="frames per episode (T)")
    p.add_argument("--out", required=True, help="output .h5 file")
    p.add_argument("--seed", type=int, default=0, help="episode i uses seed SEED + i")
    p.add_argument("--workers", type=int, default=1, help="parallel recording processes (spawn)")
    p.add_argument("--policy", choices=["random", "noop"], default="random")
    p.add_argument("--image-size", type=int, nargs="+", default=[64], metavar="N",
                   help="frame size: N for NxN or H W (default 64)")
    p.add_argument("--seg-level", choices=["root", "body"], default="root",
                   help="MuJoCo objects: world children with subtree (root) or every body (body)")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    try:
        kwargs = parse_kwargs(a.env_kwargs)
        size = _size(a.image_size)
    except ValueError as e:
        p.error(str(e))
    # Use the importable module's function so spawn workers pickle `locis_rl.data.generate.*`,
    # not `__main__.*`.
    from locis_rl.data.generate import generate as _generate

    t0 = time.perf_counter()
    path = _generate(a.env, a.episodes, a.frames, a.out, env_kwargs=kwargs, seed=a.seed, workers=a.workers,
                    policy=a.policy, image_size=size, seg_level=a.seg_level, progress=not a.no_progress)
    dt = time.perf_counter() - t0
    n = a.episodes * a.frames
    print(f"wrote {path}: {a.episodes} episodes x {a.frames} frames in {dt:.1f}s ({n / dt:.1f} frames/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
