import glob, sys
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
for d in sorted(glob.glob("/root/sweep/*_s*/tb/*")):
    ea = EventAccumulator(d); ea.Reload()
    if "rollout/ep_rew_mean" not in ea.Tags()["scalars"]: continue
    ev = ea.Scalars("rollout/ep_rew_mean")
    pts = [(e.step, round(e.value, 1)) for e in ev]
    sel = [p for p in pts if p[0] % 49152 < 4096 or p is pts[-1]]
    print(d.split("/")[3], " ".join(f"{s//1000}k:{v}" for s, v in sel))
