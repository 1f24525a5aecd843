"""How precisely do Loci-s slots place the objects of `locis/PushObjects-v0` on the table?

    python docs/measurements/cpu-rl-pusher/position_precision.py default position_precision_default.json [slots.npz]

Random pushes in 8 envs (3 episodes x 40 frames each, the first 3 frames left out), seen through
the adapters' `SlotPerception` with 8 slots (slot seed 0). Each frame, present slots are matched to
the things on the table (pusher, target, goal patch, distractors) by the Hungarian algorithm on
the IoU of the visible-mask argmax with the ground-truth masks (IoU >= 0.2; the goal's pixels are
the id-0 pixels of its green, as in `slot_coverage.py`).

Three image readouts of a matched thing's place are compared, each mapped to the table position
in the state's units (metres / 0.3, table edge at +-1, the units of the oracle slots and of the
noise in `docs/measurements/oracle-slots-imperfect/`) by one cubic polynomial of the image (x, y)
with terms in the thing's centre height (one camera for all kinds; the target and goal barely move
under random pushes, so they could not be fitted alone), fitted on the matched things of envs 0-3
and measured per kind on envs 4-7:

- ``mask``: the centroid of the thing's ground-truth mask (what a perfect segmentation at 64 px
  gives; occlusion and pixels limit it);
- ``slot_position``: the slot's `position` feature (x, y), what the policy reads;
- ``slot_mask``: the centroid of the slot's visible mask.

A second question is whether a policy can tell the things apart by the slots' Gestalt codes, as
the content-picking `SlotSetEncoder` must: a logistic regression from the Gestalt code of every
present slot to what it holds (pusher, target, goal, distractor, or nothing: a present slot matched
to no thing), fitted on envs 0-3, with its accuracy per kind on envs 4-7 (``kind_from_gestalt``,
which also counts the present slots per frame and the pixels each kind of slot shows, and asks
whether the pusher's misreadings come frame by frame or stick to whole episodes:
``pusher_errors_within_episodes``).

Reported per kind: match rate, the held-out residual's standard deviation per axis (comparable to
the per-axis Gaussian noise of the oracle-slot experiment: 0.1 there stopped learning), and the
lag-1 autocorrelation of the `slot_position` residual between consecutive frames of one episode
(independent per-frame noise: 0; a slowly drifting error: near 1).
"""
import json
import sys

import envs  # noqa: F401  (registers the env, headless GL)
import gymnasium as gym
import numpy as np
import torch
from envs.push_objects import STATE_POS_SCALE
from scipy.optimize import linear_sum_assignment

from locis_rl.evaluate import labels_from_masks
from locis_rl.rl.perception import SlotPerception, load_locis

NUM_ENVS, EPISODES, FRAMES, SKIP, NUM_SLOTS, SLOT_SEED, MIN_IOU = 8, 3, 40, 3, 8, 0, 0.2
READOUTS = ("mask", "slot_position", "slot_mask")


def centroid(mask: np.ndarray) -> np.ndarray:
    """bool ``[H, W]`` -> (x, y) in [-1, 1], pixel centres, as the slots' `position`."""
    h, w = mask.shape
    rows, cols = np.nonzero(mask)
    return np.array([((cols + 0.5) / w).mean() * 2 - 1, ((rows + 0.5) / h).mean() * 2 - 1])


def things(seg: np.ndarray, rgb: np.ndarray, objects: dict, goal: np.ndarray, env: int):
    """Ground-truth masks of one frame: list of (kind, mask [H, W], table xy, centre height)."""
    rgb = rgb.astype(np.float32) / 255
    green = (rgb[..., 1] > rgb[..., 0] + 0.15) & (rgb[..., 1] > rgb[..., 2] + 0.15)
    out = [("goal", (seg == 0) & green, goal[env], 0.0)]
    for i, oid in enumerate(objects["id"][env]):
        kind = {1: "pusher", 2: "target"}.get(int(oid), "distractor")
        out.append((kind, seg == oid, objects["position"][env, i, :2], objects["position"][env, i, 2]))
    return [t for t in out if t[1].sum() >= 4]


def poly(uv: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Cubic polynomial features of image (u, v), with height terms: ``[N, 2]``, ``[N]`` -> ``[N, F]``."""
    u, v = uv[:, 0], uv[:, 1]
    terms = [np.ones_like(u), u, v, u * u, u * v, v * v, u ** 3, u * u * v, u * v * v, v ** 3, z, z * u, z * v]
    return np.stack(terms, 1)


def collect() -> tuple[list[dict], list[dict]]:
    """Per (frame, thing) records of the three readouts, and per present slot its Gestalt and content."""
    vec = gym.vector.SyncVectorEnv([lambda: gym.make("locis/PushObjects-v0", info_segmentation=True)
                                    for _ in range(NUM_ENVS)])
    perception = SlotPerception(load_locis(sys.argv[1], num_slots=NUM_SLOTS), num_envs=NUM_ENVS,
                                device="cpu", seed=SLOT_SEED)
    rng = np.random.default_rng(0)
    records, slot_records = [], []
    for episode in range(EPISODES):
        obs, info = vec.reset(seed=2000 + 100 * episode)
        features = perception.reset(obs["rgb"], obs["depth"])
        for t in range(FRAMES):
            if t >= SKIP:
                out = perception.last_output
                labels = labels_from_masks(out["masks"]).cpu().numpy()           # [B, H, W]
                present = out["presence"].cpu().numpy() > 0.5                     # [B, K]
                position = out["position"][..., :2].cpu().numpy()                 # [B, K, 2]
                gestalt = features["gestalt"]                                      # [B, K, G]
                area = np.stack([(labels == k + 1).sum((1, 2)) for k in range(NUM_SLOTS)], 1)   # [B, K] pixels
                other = np.concatenate([features["position"], features["depth"], features["presence"][..., None],
                                        area[..., None]], -1)     # [B, K, 7]: x y size priority depth presence pixels
                for env in range(NUM_ENVS):
                    gt = things(info["segmentation"][env], obs["rgb"][env], info["objects"],
                                info["goal_position"], env)
                    slots = [k for k in range(NUM_SLOTS) if present[env, k]]
                    slot_masks = [labels[env] == k + 1 for k in slots]
                    iou = np.zeros((len(gt), len(slots)))
                    for i, (_, m, _, _) in enumerate(gt):
                        for j, s in enumerate(slot_masks):
                            union = (m | s).sum()
                            iou[i, j] = (m & s).sum() / union if union else 0.0
                    matched = dict(zip(*linear_sum_assignment(iou, maximize=True))) if slots else {}
                    held = set()
                    for i, (kind, m, xy, z) in enumerate(gt):
                        j = matched.get(i)
                        ok = j is not None and iou[i, j] >= MIN_IOU
                        held |= {j} if ok else set()
                        if ok:
                            slot_records.append({"env": env, "episode": episode, "t": t, "kind": kind,
                                                 "gestalt": gestalt[env, slots[j]], "other": other[env, slots[j]]})
                        records.append({
                            "env": env, "episode": episode, "t": t, "kind": kind, "thing": i, "matched": ok,
                            "xy": np.asarray(xy) / STATE_POS_SCALE, "z": float(z), "mask": centroid(m),
                            "slot_position": position[env, slots[j]] if ok else None,
                            "slot_mask": centroid(slot_masks[j]) if ok and slot_masks[j].any() else None})
                    slot_records += [{"env": env, "episode": episode, "t": t, "kind": "nothing",
                                      "gestalt": gestalt[env, slots[j]], "other": other[env, slots[j]]}
                                     for j in range(len(slots)) if j not in held]
            action = rng.uniform(-1, 1, (NUM_ENVS, 2)).astype(np.float32)
            obs, _, terminated, truncated, info = vec.step(action)
            features = perception.step(obs["rgb"], obs["depth"], reset_mask=terminated | truncated)
    vec.close()
    return records, slot_records


def residuals(rows: list[dict], readout: str) -> np.ndarray:
    """Residual ``[N, 2]`` (state units) of the polynomial readout fitted on the rows of envs 0-3."""
    uv = np.stack([r[readout] for r in rows])
    z = np.array([r["z"] for r in rows]) / STATE_POS_SCALE
    xy = np.stack([r["xy"] for r in rows])
    features = poly(uv, z)
    fit = np.array([r["env"] < NUM_ENVS // 2 for r in rows])
    coef, *_ = np.linalg.lstsq(features[fit], xy[fit], rcond=None)
    return features @ coef - xy


def lag1(rows: list[dict], res: np.ndarray) -> float:
    """Lag-1 autocorrelation of residuals of consecutive frames of the same thing and episode."""
    index = {(r["env"], r["episode"], r["thing"], r["t"]): i for i, r in enumerate(rows)}
    pairs = [(i, index[(r["env"], r["episode"], r["thing"], r["t"] + 1)]) for i, r in enumerate(rows)
             if (r["env"], r["episode"], r["thing"], r["t"] + 1) in index]
    if len(pairs) < 10:
        return float("nan")
    a, b = res[[p[0] for p in pairs]], res[[p[1] for p in pairs]]
    return float(np.mean([np.corrcoef(a[:, d], b[:, d])[0, 1] for d in range(2)]))


def kind_from_gestalt(slot_records: list[dict]) -> dict:
    """Held-out accuracy per content of a logistic regression Gestalt -> content, and slots per frame."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x = np.stack([r["gestalt"] for r in slot_records])
    y = np.array([r["kind"] for r in slot_records])
    fit = np.array([r["env"] < NUM_ENVS // 2 for r in slot_records])
    classifier = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(x[fit], y[fit])
    predicted = classifier.predict(x[~fit])
    pixels = np.array([r["other"][6] for r in slot_records])       # visible pixels (argmax) per slot
    return {"present_slots_per_frame": len(slot_records) / (EPISODES * (FRAMES - SKIP) * NUM_ENVS),
            "visible_pixels_median": {k: float(np.median(pixels[y == k])) for k in np.unique(y)},
            "fraction_under_4_visible_pixels": {k: float((pixels[y == k] < 4).mean()) for k in np.unique(y)},
            "accuracy": float((predicted == y[~fit]).mean()),
            "accuracy_per_kind": {k: float((predicted[y[~fit] == k] == k).mean()) for k in np.unique(y)},
            "slots_per_kind": {k: int((y == k).sum()) for k in np.unique(y)},
            "pusher_errors_within_episodes": pusher_error_persistence(
                [r for r, held_out in zip(slot_records, ~fit) if held_out], predicted)}


def pusher_error_persistence(records: list[dict], predicted: np.ndarray) -> dict:
    """Are the held-out pusher slot's misreadings scattered over frames or stuck to episodes?

    Per (env, episode) the fraction of frames whose pusher slot is not read as the pusher; their
    spread against the binomial spread that frame-by-frame independent errors would give, and the
    lag-1 correlation of the error indicator between consecutive frames.
    """
    wrong = {(r["env"], r["episode"], r["t"]): p != "pusher"
             for r, p in zip(records, predicted) if r["kind"] == "pusher"}
    episodes: dict[tuple, list[bool]] = {}
    for (env, episode, _), w in wrong.items():
        episodes.setdefault((env, episode), []).append(w)
    rates = np.array([np.mean(v) for v in episodes.values()])
    frames = np.mean([len(v) for v in episodes.values()])
    p = float(np.mean(list(wrong.values())))
    pairs = np.array([(w, wrong[(env, episode, t + 1)]) for (env, episode, t), w in wrong.items()
                      if (env, episode, t + 1) in wrong], float)
    return {"episodes": len(rates), "frames_per_episode": float(frames), "error_rate": p,
            "per_episode_error_rates": sorted(float(r) for r in rates),
            "per_episode_std": float(rates.std()), "std_if_independent": float(np.sqrt(p * (1 - p) / frames)),
            "lag1_correlation": float(np.corrcoef(pairs[:, 0], pairs[:, 1])[0, 1])}


def main() -> None:
    torch.set_num_threads(1)
    records, slot_records = collect()
    result = {"checkpoint": sys.argv[1], "num_slots": NUM_SLOTS, "frames": EPISODES * (FRAMES - SKIP) * NUM_ENVS,
              "kinds": {}}
    matched = [r for r in records if r["matched"] and r["slot_mask"] is not None]
    held = np.array([r["env"] >= NUM_ENVS // 2 for r in matched])
    res = {readout: residuals(matched, readout) for readout in READOUTS}
    for kind in ("pusher", "target", "goal", "distractor"):
        rows = [r for r in records if r["kind"] == kind]
        of_kind = held & np.array([r["kind"] == kind for r in matched])
        entry = {"visible": len(rows), "match_rate": sum(r["matched"] for r in rows) / max(len(rows), 1),
                 "xy_std": float(np.std(np.stack([r["xy"] for r in rows]), 0).mean()),
                 "held_out_matches": int(of_kind.sum())}
        for readout in READOUTS:
            entry[f"{readout}_residual_std"] = [float(s) for s in res[readout][of_kind].std(0)]
        entry["slot_position_residual_lag1"] = lag1([r for r, k in zip(matched, of_kind) if k],
                                                    res["slot_position"][of_kind])
        result["kinds"][kind] = entry
    result["kind_from_gestalt"] = kind_from_gestalt(slot_records)
    print(json.dumps(result, indent=1))
    with open(sys.argv[2], "w") as f:
        json.dump(result, f, indent=1)
    if len(sys.argv) > 3:  # per present slot, for further looks: gestalt [S, G], other [S, 7], kind, env
        np.savez_compressed(sys.argv[3], gestalt=np.stack([r["gestalt"] for r in slot_records]),
                            other=np.stack([r["other"] for r in slot_records]),
                            kind=np.array([r["kind"] for r in slot_records]),
                            env=np.array([r["env"] for r in slot_records]))


if __name__ == "__main__":
    main()
