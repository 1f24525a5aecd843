"""A/B of PatchConvTranspose2d (matmul) vs the plain transposed convolution: shipped checkpoint,
one batched LociS.step of 8 frames, 1 thread, rounds interleaved so both see the same load."""
import torch, time
from torch import nn
from locis_rl.model.blocks import PatchConvTranspose2d
from locis_rl.rl.perception import load_model
torch.set_num_threads(1)
m = load_model('default').eval().requires_grad_(False)
B = 8
rgb = torch.rand(B, 3, 64, 64)
fast = PatchConvTranspose2d.forward
def run(n=8):
    state = m.init_state(B, 'cpu', seed=0)
    with torch.inference_mode():
        out, state = m.step(rgb, None, state)
        t = time.perf_counter()
        for _ in range(n): out, state = m.step(rgb, None, state)
    return (time.perf_counter() - t) / n * 1000
res = {'convT': [], 'matmul': []}
for r in range(4):
    PatchConvTranspose2d.forward = nn.ConvTranspose2d.forward; res['convT'].append(run())
    PatchConvTranspose2d.forward = fast; res['matmul'].append(run())
for k, v in res.items(): print(k, [round(x) for x in v], 'median', sorted(v)[len(v)//2])
