"""The optional objects/context phase: multi-object warm-up passes supervised by instance masks."""
from __future__ import annotations

import torch

from locis_rl.pretrain.config import load_train_config
from locis_rl.pretrain.stages import PHASES, phases_for, pick_slot_objects


def test_context_phase_only_when_it_has_steps():
    assert "objects/context" in PHASES
    off = load_train_config("quickstart", {})
    on = load_train_config("quickstart", {"stages.objects.context_steps": 5})
    assert "objects/context" not in phases_for("all", off)
    assert phases_for("objects", on) == ["objects", "objects/context"]
    assert phases_for("all", on).index("objects/context") == phases_for("all", on).index("objects") + 1


def test_pick_slot_objects_gives_each_slot_its_own_object():
    inst = torch.zeros(3, 8, 8, dtype=torch.long)
    inst[0, 0:2, 0:2], inst[0, 4:6, 4:6], inst[0, 6:8, 0:2] = 3, 7, 9  # three objects
    inst[1, 0:4, 0:4] = 2  # one object
    inst[1, 7, 7] = 5  # one pixel: below min_pixels
    masks, valid = pick_slot_objects(inst, num_slots=2, min_pixels=2, generator=torch.Generator().manual_seed(0))
    assert masks.shape == (3, 2, 8, 8) and valid.tolist() == [[True, True], [True, False], [False, False]]
    for row in range(3):
        picked = [int(inst[row][masks[row, s]].unique().item()) for s in range(2) if valid[row, s]]
        assert len(set(picked)) == len(picked) and 0 not in picked and 5 not in picked
        for s in range(2):  # a slot's mask is the whole instance, or empty when invalid
            if valid[row, s]:
                assert torch.equal(masks[row, s], inst[row] == inst[row][masks[row, s]][0])
            else:
                assert not masks[row, s].any()


def test_later_passes_see_the_decoded_context():
    from locis_rl.model import LociS
    from locis_rl.model.config import LociSConfig
    from locis_rl.pretrain.data import Batch
    from locis_rl.pretrain.stages import ContextStage

    torch.manual_seed(0)
    model = LociS(LociSConfig.preset("tiny").replace(image_size=32, num_slots=3)).train()
    cfg = load_train_config("quickstart", {"stages.objects.context_passes": 2, "stages.objects.position_weight": 1.0})
    inst = torch.zeros(2, 1, 32, 32, dtype=torch.long)
    inst[:, 0, 4:12, 4:12], inst[:, 0, 18:26, 18:26] = 1, 2
    rgb = torch.rand(2, 1, 3, 32, 32)
    batch = Batch(rgb=rgb, depth=None, segmentation=inst, foreground=(inst > 0).float()[:, :, None], instances=inst)
    seen = []
    hook = model.encoder.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach().clone()))
    stage = ContextStage(model, cfg)
    stage.freeze_others()
    loss, logs = stage(batch, generator=torch.Generator().manual_seed(1))
    hook.remove()
    assert len(seen) == 2 and torch.isfinite(loss)
    visible, slot_rgb = 6, slice(8, 11)  # channels of LociS._encoder_inputs (RGB model)
    assert seen[0][:, visible].abs().sum() == 0 and seen[0][:, slot_rgb].abs().sum() == 0
    assert seen[1][:, visible].abs().sum() > 0 and seen[1][:, slot_rgb].abs().sum() > 0
    assert {"charts/context_mask_iou_pass1", "charts/context_mask_iou_pass2"} <= set(logs)
    loss.backward()
    assert model.encoder.parameters().__next__().grad is not None
    assert all(p.grad is None for p in model.background.parameters())
