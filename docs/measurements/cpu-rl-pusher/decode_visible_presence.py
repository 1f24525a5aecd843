"""`examples/decode_push_state.py` with each slot's presence gated by what it shows (exploratory).

    python docs/measurements/cpu-rl-pusher/decode_visible_presence.py MIN_PIXELS [decode_push_state.py flags]
    python docs/measurements/cpu-rl-pusher/decode_visible_presence.py 4 \
        --json-out decode_push_state_visible_presence.json

Every slot the model keeps is ``presence`` 1, also one whose visible mask covers no pixel (an
occluded object, or a slot hidden behind another slot on the same object;
`position_precision.py` counts them). Here a slot counts as present only while its visible mask
``masks[:, k]`` sums to at least ``MIN_PIXELS`` pixels, so the encoder's content-picking softmax
skips the hidden ones. The rest is the example unchanged.
"""
import runpy
import sys

from locis_rl.rl import perception

MIN_PIXELS = float(sys.argv[1])
_run = perception.SlotPerception.run


def run_with_visible_presence(self, rgb, depth, state):
    features, out, state = _run(self, rgb, depth, state)
    shown = out["masks"][:, :-1].float().sum((-2, -1))              # [B, K] visible pixels per slot
    features["presence"] = features["presence"] * (shown >= MIN_PIXELS).float()
    return features, out, state


if __name__ == "__main__":
    perception.SlotPerception.run = run_with_visible_presence
    sys.argv = ["examples/decode_push_state.py"] + sys.argv[2:]
    runpy.run_path("examples/decode_push_state.py", run_name="__main__")
