"""Picture what each of the 8 slots holds on `locis/PushObjects-v0`, hidden slots included.

    python docs/measurements/cpu-rl-pusher/hidden_slots.py hidden_slots.png      # ~1 min on CPU

Three episodes (one row each) after 12 random pushes, shipped checkpoint, 8 slots, `seg`, as the
RL comparison sees them. Per row: the input frame; the adapters' overlay (`SlotPerception.render`:
masks in colour, positions as crosses); then per slot its unoccluded mask (grey: where the slot
says its object is) with the pixels it wins in the frame (argmax of the visible masks, as
`locis_rl.evaluate.labels_from_masks`; in the slot's colour), titled with their count. Slots that
win no pixel are still present (`presence` 1), so a policy counts them among the candidates;
`position_precision.py` counts them over many frames.
"""
import sys

import envs  # noqa: F401  (registers the env, headless GL)
import gymnasium as gym
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from locis_rl.atomic_files import write_atomically  # noqa: E402
from locis_rl.evaluate import labels_from_masks  # noqa: E402
from locis_rl.rl.perception import SlotPerception, load_locis, slot_palette  # noqa: E402

NUM_SLOTS, PUSHES, EPISODE_SEEDS = 8, 12, (2000, 2100, 2200)


class CapturingPerception(SlotPerception):
    """`SlotPerception` that keeps the whole model output of its last step (object masks included)."""

    def run(self, rgb, depth, state):
        features, out, state = super().run(rgb, depth, state)
        self.captured = out
        return features, out, state


def main(out_path: str) -> None:
    torch.set_num_threads(1)
    env = gym.make("locis/PushObjects-v0")
    perception = CapturingPerception(load_locis("default", num_slots=NUM_SLOTS), num_envs=1, device="cpu", seed=0)
    palette = slot_palette(NUM_SLOTS).numpy()                                         # [K, 3] in [0, 1]
    rng = np.random.default_rng(0)
    fig, axes = plt.subplots(len(EPISODE_SEEDS), NUM_SLOTS + 2,
                             figsize=(1.6 * (NUM_SLOTS + 2), 1.8 * len(EPISODE_SEEDS)))
    for row, seed in enumerate(EPISODE_SEEDS):
        obs, _ = env.reset(seed=seed)
        perception.reset(obs["rgb"][None], obs["depth"][None])
        for _ in range(PUSHES):
            obs, *_ = env.step(rng.uniform(-1, 1, 2).astype(np.float32))
            perception.step(obs["rgb"][None], obs["depth"][None])
        out = perception.captured
        labels = labels_from_masks(out["masks"])[0].numpy()                            # [H, W]: 0 bg, k + 1 slot k
        unoccluded = out["object_masks"][0].float().numpy()                            # [K, H, W]
        presence = out["presence"][0].numpy()
        axes[row, 0].imshow(obs["rgb"])
        axes[row, 1].imshow(perception.render()[0])
        for k in range(NUM_SLOTS):
            picture = np.repeat(0.85 * unoccluded[k, ..., None], 3, -1)
            shown = labels == k + 1
            picture[shown] = palette[k]
            axes[row, k + 2].imshow(picture.clip(0, 1))
            axes[row, k + 2].set_title(f"slot {k}: {int(shown.sum())} px"
                                       + ("" if presence[k] > 0.5 else " (absent)"), fontsize=8)
    axes[0, 0].set_title("input", fontsize=8)
    axes[0, 1].set_title("slots (overlay)", fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([]), ax.set_yticks([])
    fig.suptitle("PushObjects through the shipped checkpoint, 8 slots: grey = unoccluded mask, "
                 "colour = the visible part", fontsize=9)
    fig.tight_layout()
    write_atomically(out_path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    env.close()


if __name__ == "__main__":
    main(sys.argv[1])
