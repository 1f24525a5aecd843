"""Tests for locis_rl.metrics: sklearn oracle for ARI / AMI, hand cases for matching metrics."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_mutual_info_score, adjusted_rand_score

from locis_rl import metrics as M

TOL = 1e-6


def _sk_row(fn, pred_row: torch.Tensor, true_row: torch.Tensor, fg: bool) -> float:
    t = true_row.reshape(-1).numpy()
    p = pred_row.reshape(-1).numpy()
    if fg:
        keep = t != 0
        if not keep.any():
            return math.nan
        t, p = t[keep], p[keep]
    return float(fn(t, p))


def _check_all(pred: torch.Tensor, true: torch.Tensor) -> None:
    got = {
        ("ari", False): M.ari(pred, true),
        ("ari", True): M.fg_ari(pred, true),
        ("ami", False): M.ami(pred, true),
        ("ami", True): M.ami(pred, true, foreground_only=True),
    }
    for (name, fg), vals in got.items():
        assert vals.dtype == torch.float64 and vals.shape == (pred.shape[0],)
        fn = adjusted_rand_score if name == "ari" else adjusted_mutual_info_score
        for b in range(pred.shape[0]):
            ref = _sk_row(fn, pred[b], true[b], fg)
            if math.isnan(ref):
                assert math.isnan(float(vals[b])), (name, fg, b)
            else:
                assert abs(float(vals[b]) - ref) < TOL, (name, fg, b, float(vals[b]), ref)


def _random_batch(seed: int, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    B = shape[0]
    true = torch.empty(shape, dtype=torch.long)
    pred = torch.empty(shape, dtype=torch.long)
    for b in range(B):  # rows of different structure
        kt = 5 + (seed + b) % 6
        kp = 5 + (seed * 3 + b) % 6
        true[b] = torch.randint(0, kt, shape[1:], generator=g)
        noise = torch.randint(0, kp, shape[1:], generator=g)
        keep = torch.rand(shape[1:], generator=g) < (0.2 * b % 1.0)
        pred[b] = torch.where(keep, true[b] * 3 + 11, noise)  # relabelled partially-correct
    return pred, true


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("shape", [(4, 25, 40), (3, 4, 10, 25)])
def test_random_labelings_match_sklearn(seed, shape):
    pred, true = _random_batch(seed, shape)
    _check_all(pred, true)


def test_structured_foreground_match_sklearn():
    g = torch.Generator().manual_seed(7)
    true = torch.randint(1, 8, (3, 6, 16, 16), generator=g)
    true[:, :, :10] = 0  # large background
    pred = torch.where(torch.rand(true.shape, generator=g) < 0.8, true, torch.randint(0, 6, true.shape, generator=g))
    pred[2] = torch.randint(-5, 3, pred[2].shape, generator=g)  # negative labels
    _check_all(pred, true)


def test_adversarial_cases_match_sklearn():
    n = 1000
    x = torch.arange(n).view(1, 20, 50)
    zeros = torch.zeros_like(x)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0)).view(1, 20, 50)
    g = torch.Generator().manual_seed(1)
    rand = torch.randint(0, 7, x.shape, generator=g)
    rand_perm = (rand * 5 + 2) % 7 + 100  # same partition, permuted ids
    cases = [
        (x, x),  # all pixels distinct, identical
        (perm, x),  # all distinct, permuted ids
        (zeros, zeros),  # single cluster both (and empty foreground)
        (zeros + 3, zeros + 1),  # single cluster, foreground = everything
        (x, zeros + 1),  # all distinct vs one cluster
        (zeros + 1, x),  # one cluster vs all distinct
        (x % 2, x),
        (x // 2, x),
        (rand, rand),  # identical
        (rand_perm, rand),  # permuted labels
        (rand, zeros),  # empty foreground
        (x, x % 500),
    ]
    pred = torch.cat([c[0] for c in cases])
    true = torch.cat([c[1] for c in cases])
    _check_all(pred, true)
    # identical partitions give exactly 1
    assert float(M.ari(rand_perm, rand)) == 1.0
    assert abs(float(M.ami(rand_perm, rand)) - 1.0) < 1e-12


def test_tiny_inputs_match_sklearn():
    # single pixel, two pixels, one foreground pixel
    cases = [
        (torch.tensor([[[5]]]), torch.tensor([[[2]]])),
        (torch.tensor([[[0, 1]]]), torch.tensor([[[1, 1]]])),
        (torch.tensor([[[0, 1]]]), torch.tensor([[[1, 2]]])),
        (torch.tensor([[[0, 1, 1]]]), torch.tensor([[[0, 0, 3]]])),
    ]
    for p, t in cases:
        _check_all(p, t)


def test_fg_empty_is_nan_and_rows_independent():
    pred, true = _random_batch(5, (3, 12, 12))
    true[1] = 0
    out = M.fg_ari(pred, true)
    assert math.isnan(float(out[1])) and not torch.isnan(out[[0, 2]]).any()
    assert math.isnan(float(M.ami(pred, true, foreground_only=True)[1]))
    # each row equals the metric computed on that row alone
    for fn in (M.ari, M.fg_ari, M.ami, M.miou, M.f1, M.oca):
        full = fn(pred, true)
        for b in range(3):
            single = fn(pred[b : b + 1], true[b : b + 1])
            assert torch.allclose(full[b : b + 1], single, atol=1e-12, equal_nan=True), fn.__name__


def test_masks_to_labels_and_type_checks():
    masks = torch.zeros(2, 3, 4, 5, 5)
    masks[:, :, 2, :, 2:] = 1.0
    lab = M.masks_to_labels(masks)
    assert lab.shape == (2, 3, 5, 5)
    assert (lab[..., 2:] == 2).all() and (lab[..., :2] == 0).all()
    with pytest.raises(TypeError):
        M.ari(masks[:, 0, 0].float(), lab[:, 0])
    with pytest.raises(ValueError):
        M.ari(lab, lab[:, 0])


def test_miou_permuted_perfect_and_hand_case():
    g = torch.Generator().manual_seed(0)
    true = torch.randint(0, 5, (2, 3, 8, 8), generator=g)
    pred = (true * 7 + 3) % 5 + 10  # bijective relabel, background included
    assert torch.allclose(M.miou(pred, true), torch.ones(2, dtype=torch.float64))
    assert torch.allclose(M.miou(pred, true, per_frame=True), torch.ones(2, dtype=torch.float64))
    # the segment relabelled from background (13) must be declared background for F1 = 1 ...
    assert torch.allclose(M.f1(pred, true, pred_background=13), torch.ones(2, dtype=torch.float64))
    # ... otherwise it is a false-positive object: 2 * 4 / (5 + 4)
    assert torch.allclose(M.f1(pred, true, pred_background=None), torch.full((2,), 8 / 9, dtype=torch.float64))

    # hand case on a 1x6 strip: true objects 1 = {0,1,2}, 2 = {3,4}; background {5}
    true = torch.tensor([[[1, 1, 1, 2, 2, 0]]])
    pred = torch.tensor([[[7, 7, 8, 8, 8, 8]]])
    # IoU(7,1) = 2/3, IoU(8,2) = 2/4, IoU(8,1) = 1/6, IoU(7,2) = 0 -> best 2/3 + 1/2
    expected = (2 / 3 + 1 / 2) / 2
    assert abs(float(M.miou(pred, true)) - expected) < 1e-12
    # with background: IoU(8,0)=1/4; best assignment among 2 preds for 3 true objects
    # options: (7->1, 8->2) = 7/6, (7->1, 8->0) = 11/12, ... -> 7/6, background unmatched scores 0
    assert abs(float(M.miou(pred, true, include_background=True)) - (2 / 3 + 1 / 2) / 3) < 1e-12
    # F1 at IoU >= 0.5, both segments are objects: TP = 2 (2/3 and 1/2) -> 2*2/(2+2)
    assert abs(float(M.f1(pred, true, pred_background=None)) - 1.0) < 1e-12
    # segment 8 declared background: TP = 1, n_pred = 1, n_true = 2 -> 2/3
    assert abs(float(M.f1(pred, true, pred_background=8)) - 2 / 3) < 1e-12


def test_miou_unmatched_object_scores_zero_and_nan_without_objects():
    true = torch.tensor([[[1, 1, 2, 2, 3, 3]]])
    pred = torch.tensor([[[0, 0, 1, 1, 1, 1]]])  # 2 segments for 3 objects
    # best: 0->1 (IoU 1), 1->2 or 1->3 (IoU 2/4), third object unmatched -> 0
    assert abs(float(M.miou(pred, true)) - (1 + 0.5 + 0) / 3) < 1e-12
    assert math.isnan(float(M.miou(pred, torch.zeros_like(true))))


def test_miou_identity_swap_per_frame_vs_per_sequence():
    # two frames, two objects (left/right halves); prediction swaps ids in frame 2
    true = torch.zeros(1, 2, 4, 4, dtype=torch.long)
    true[:, :, :, :2] = 1
    true[:, :, :, 2:] = 2
    pred = true.clone()
    pred[:, 1] = 3 - true[:, 1]
    assert abs(float(M.miou(pred, true, per_frame=True)) - 1.0) < 1e-12
    # per sequence each pred segment covers half of each object over time: IoU = 8 / (16 + 16 - 8)
    assert abs(float(M.miou(pred, true)) - 1 / 3) < 1e-12
    assert float(M.fg_ari(pred, true)) < 0.5


def test_oca_and_count_objects():
    true = torch.tensor([[[0, 1, 2, 2]], [[0, 1, 1, 1]], [[0, 0, 0, 0]]])
    pred = torch.tensor([[[0, 5, 6, 6]], [[0, 5, 6, 6]], [[0, 0, 0, 3]]])
    assert M.count_objects(true).tolist() == [2, 1, 0]
    assert M.count_objects(pred).tolist() == [2, 2, 1]
    assert M.count_objects(pred, min_pixels=2).tolist() == [1, 1, 0]
    assert M.oca(pred, true).tolist() == [1.0, 0.0, 0.0]
    assert M.oca(pred, true, min_pixels=2).tolist() == [0.0, 1.0, 1.0]
    assert M.object_counting_accuracy(torch.tensor([3, 2]), torch.tensor([3, 3])).tolist() == [1.0, 0.0]


def test_ssim_identity_noise_and_rows():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 32, 32, generator=g)
    assert torch.allclose(M.ssim(x, x), torch.ones(3), atol=1e-5)
    noise = torch.randn(x.shape, generator=g)
    s = [M.ssim(x, (x + a * noise).clamp(0, 1)) for a in (0.02, 0.1, 0.3)]
    assert (s[0] < 1).all() and (s[1] < s[0]).all() and (s[2] < s[1]).all()
    # rows independent, depth (C=1), video shape, small images, float64
    y = (x + 0.1 * noise).clamp(0, 1)
    full = M.ssim(x, y)
    assert torch.allclose(full[1:2], M.ssim(x[1:2], y[1:2]))
    assert M.ssim(x[:, :1], y[:, :1]).shape == (3,)
    assert M.ssim(x.view(1, 3, 3, 32, 32), y.view(1, 3, 3, 32, 32)).shape == (1,)
    assert M.ssim(x[..., :8, :8].double(), y[..., :8, :8].double()).dtype == torch.float64


def test_ssim_matches_direct_formula():
    # one 11x11 window over an 11x11 image = single SSIM value from weighted global stats
    g = torch.Generator().manual_seed(3)
    x = torch.rand(1, 1, 11, 11, generator=g, dtype=torch.float64)
    y = torch.rand(1, 1, 11, 11, generator=g, dtype=torch.float64)
    r = torch.arange(11, dtype=torch.float64) - 5
    w1 = torch.exp(-(r**2) / (2 * 1.5**2))
    w = torch.outer(w1, w1)
    w = w / w.sum()
    mx, my = (w * x).sum(), (w * y).sum()
    vx, vy = (w * x * x).sum() - mx**2, (w * y * y).sum() - my**2
    cxy = (w * x * y).sum() - mx * my
    c1, c2 = 0.01**2, 0.03**2
    ref = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    assert abs(float(M.ssim(x, y)) - float(ref)) < 1e-12


def test_segmentation_report_keys_and_nanmean():
    pred, true = _random_batch(2, (3, 2, 12, 12))
    true[0] = 0  # NaN row for the foreground metrics
    rep = M.segmentation_report(pred, true)
    assert list(rep) == ["AMI-A", "ARI-A", "AMI-O", "ARI-O", "IoU", "F1", "OCA"]
    assert abs(rep["ARI-O"] - float(M.fg_ari(pred, true)[1:].mean())) < 1e-12
    assert abs(rep["ARI-A"] - float(M.ari(pred, true).mean())) < 1e-12
    assert all(isinstance(v, float) and not math.isnan(v) for v in rep.values())
    perfect = M.segmentation_report(true[1:], true[1:])
    assert all(abs(v - 1.0) < 1e-9 for v in perfect.values()), perfect


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    pred, true = _random_batch(0, (2, 3, 16, 16))
    for fn in (M.ari, M.fg_ari, M.ami, M.miou, M.f1, M.oca):
        out = fn(pred.cuda(), true.cuda())
        assert out.device.type == "cuda"
        assert torch.allclose(out.cpu(), fn(pred, true), atol=1e-9, equal_nan=True)
