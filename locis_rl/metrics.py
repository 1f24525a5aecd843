"""Batched, vectorised segmentation and reconstruction metrics (Loci-s table 2 / figure 8).

All segmentation metrics take integer label maps of shape ``(B, H, W)`` (images) or
``(B, T, H, W)`` (videos) and return a ``float64`` tensor of shape ``(B,)`` -- one value
per batch row, on the input device.  For video every metric treats the whole sequence as
one sample set (a segment / object is the union of its pixels over all frames), so identity
switches over time are penalised, unless stated otherwise (``miou(per_frame=True)``).

Label conventions
-----------------
* ``true``: label ``0`` is background; every other value is one object.
* ``pred``: arbitrary integer segment ids (e.g. slot indices from :func:`masks_to_labels`).
  Only :func:`f1`, :func:`count_objects` and :func:`oca` need to know which predicted
  segment is background (``pred_background``, default ``0``); ARI/AMI/mIoU do not.

Definitions
-----------
* ``ari`` (ARI-A): adjusted Rand index over all pixels, numerically the same as
  ``sklearn.metrics.adjusted_rand_score`` including its edge cases (``n <= 1``, both
  labelings one cluster, perfect agreement -> ``1.0``).
* ``fg_ari`` (ARI-O / FG-ARI): ARI over pixels whose true label is not 0.
* ``ami`` (AMI-A / AMI-O): adjusted mutual information with arithmetic-mean normalisation
  and the exact expected-MI term, same as ``sklearn.metrics.adjusted_mutual_info_score``.
* ``miou``: mean IoU over true objects after Hungarian matching (per sequence by default).
* ``f1``: object-detection F1 at IoU >= 0.5 after Hungarian matching.
* ``oca``: object counting accuracy (1 if the predicted object count equals the true one).
* ``ssim``: Gaussian-window SSIM (11x11, sigma 1.5) for images ``(B, C, H, W)``.

NaN policy: a metric that is undefined for a row returns ``NaN`` for that row instead of an
arbitrary number; :func:`segmentation_report` averages with ``nanmean``.  Undefined means:
``fg_ari`` / ``ami(foreground_only=True)`` when the row has no foreground pixel (sklearn
would return 1.0 on an empty labeling, which would silently inflate the score), and
``miou`` / ``f1`` when the row has no true object (and, for ``f1``, no predicted object).

Combinatorics (contingency tables, ARI, MI, expected MI) run in ``float64``/``int64`` on the
input device.  No Python loop runs over pixels; the only Python loops are the per-row
(per-frame) Hungarian matchings on small ``(K x N)`` IoU tables via
``scipy.optimize.linear_sum_assignment`` and a loop over memory chunks of the expected-MI
terms.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

__all__ = [
    "masks_to_labels",
    "ari",
    "fg_ari",
    "ami",
    "miou",
    "f1",
    "count_objects",
    "object_counting_accuracy",
    "oca",
    "ssim",
    "segmentation_report",
]

_EPS64 = float(np.finfo(np.float64).eps)
# Maximum number of expected-MI terms evaluated at once (memory bound, ~10 float64 temps each).
_EMI_CHUNK = 1 << 22


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------
def masks_to_labels(masks: torch.Tensor) -> torch.Tensor:
    """Hard label map from (soft) slot masks.

    Args:
        masks: ``(B, K, H, W)`` or ``(B, T, K, H, W)`` slot masks / logits; slot dim is ``-3``.

    Returns:
        ``int64`` labels ``(B, H, W)`` or ``(B, T, H, W)``: the argmax slot index per pixel.
    """
    if masks.dim() not in (4, 5):
        raise ValueError(f"masks must be (B, K, H, W) or (B, T, K, H, W), got {tuple(masks.shape)}")
    return masks.argmax(dim=-3)


def _check_labels(pred: torch.Tensor, true: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate and flatten ``(B, [T,] H, W)`` label maps to ``(B, N)`` int64."""
    if pred.shape != true.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and true {tuple(true.shape)} must have the same shape")
    if pred.dim() not in (3, 4):
        raise ValueError(f"labels must be (B, H, W) or (B, T, H, W), got {tuple(pred.shape)}")
    for name, x in (("pred", pred), ("true", true)):
        if x.is_floating_point() or x.is_complex():
            raise TypeError(f"{name} must be an integer label map (use masks_to_labels), got {x.dtype}")
    if pred.device != true.device:
        raise ValueError("pred and true must be on the same device")
    B = pred.shape[0]
    return pred.reshape(B, -1).long(), true.reshape(B, -1).long()


@dataclass
class _Contingency:
    """Sparse per-row contingency table: only the non-zero cells and marginals.

    ``cell_row``/``cell_count``: batch row and count ``n_ij`` of each non-zero cell.
    ``t_row``/``t_count``: row and size ``a_i`` of each true cluster present.
    ``p_row``/``p_count``: row and size ``b_j`` of each predicted cluster present.
    ``cell_a``/``cell_b``: true / pred cluster size of each cell's row / column.
    ``n``: ``(B,)`` number of samples per row.
    """

    B: int
    n: torch.Tensor
    cell_row: torch.Tensor
    cell_count: torch.Tensor
    t_row: torch.Tensor
    t_count: torch.Tensor
    p_row: torch.Tensor
    p_count: torch.Tensor
    cell_a: torch.Tensor
    cell_b: torch.Tensor

    def per_row(self, row: torch.Tensor, val: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(self.B, dtype=val.dtype, device=val.device)
        return out.index_add_(0, row, val)

    def n_clusters(self) -> tuple[torch.Tensor, torch.Tensor]:
        ones_t = torch.ones_like(self.t_row)
        ones_p = torch.ones_like(self.p_row)
        return self.per_row(self.t_row, ones_t), self.per_row(self.p_row, ones_p)


def _contingency(pred: torch.Tensor, true: torch.Tensor, foreground_only: bool) -> _Contingency:
    """Contingency counts of ``(B, N)`` labels as one bincount on ``(row, pred, true)`` keys.

    Labels are compacted (``torch.unique``) first, so arbitrary / negative / sparse ids work,
    and only non-zero cells are materialised (``torch.unique(return_counts=True)`` on the
    combined key ``(row * Up + pred) * Ut + true``), so memory is O(N) even when every pixel
    is its own cluster.
    """
    B, N = pred.shape
    row = torch.arange(B, device=pred.device).unsqueeze(1).expand(B, N)
    if foreground_only:
        keep = true != 0
        row, p, t = row[keep], pred[keep], true[keep]
    else:
        row, p, t = row.reshape(-1), pred.reshape(-1), true.reshape(-1)
    n = torch.bincount(row, minlength=B)
    if row.numel() == 0:
        e = row.new_zeros(0)
        return _Contingency(B, n, e, e, e, e, e, e, e, e)
    _, p_id = torch.unique(p, return_inverse=True)
    _, t_id = torch.unique(t, return_inverse=True)
    up = int(p_id.max()) + 1
    ut = int(t_id.max()) + 1
    cell_key, cell_count = torch.unique((row * up + p_id) * ut + t_id, return_counts=True)
    t_key, t_count = torch.unique(row * ut + t_id, return_counts=True)
    p_key, p_count = torch.unique(row * up + p_id, return_counts=True)
    cell_row = cell_key // (up * ut)
    cell_t = torch.searchsorted(t_key, cell_row * ut + cell_key % ut)
    cell_p = torch.searchsorted(p_key, cell_row * up + (cell_key // ut) % up)
    return _Contingency(
        B=B,
        n=n,
        cell_row=cell_row,
        cell_count=cell_count,
        t_row=t_key // ut,
        t_count=t_count,
        p_row=p_key // up,
        p_count=p_count,
        cell_a=t_count[cell_t],
        cell_b=p_count[cell_p],
    )


# --------------------------------------------------------------------------------------
# ARI
# --------------------------------------------------------------------------------------
def _ari_from_contingency(c: _Contingency) -> torch.Tensor:
    """sklearn's pair-confusion formulation of ARI, per row.

    With ``S = sum n_ij^2``, ``A = sum a_i^2`` (true sizes), ``Bp = sum b_j^2`` (pred sizes):
    ``tp = S - n``, ``fp = A - S``, ``fn = Bp - S``, ``tn = n^2 - fp - fn - S`` (ordered pairs) and
    ``ARI = 2 (tp tn - fn fp) / ((tp + fn)(fn + tn) + (tp + fp)(fp + tn))``;
    ``fn == fp == 0`` (perfect agreement, includes ``n <= 1`` and both-single-cluster) -> 1.0.
    The denominator is zero only in that special case.
    """
    sq = lambda x: x.to(torch.float64) ** 2  # noqa: E731
    n = c.n.to(torch.float64)
    s = c.per_row(c.cell_row, sq(c.cell_count))
    a2 = c.per_row(c.t_row, sq(c.t_count))
    b2 = c.per_row(c.p_row, sq(c.p_count))
    tp = s - n
    # sklearn's pair_confusion_matrix(labels_true, labels_pred): C[0,1] uses pred sizes, C[1,0] true sizes
    fp = b2 - s
    fn = a2 - s
    tn = n * n - fp - fn - s
    num = 2.0 * (tp * tn - fn * fp)
    den = (tp + fn) * (fn + tn) + (tp + fp) * (fp + tn)
    perfect = (fn == 0) & (fp == 0)
    return torch.where(perfect, torch.ones_like(n), num / torch.where(perfect, torch.ones_like(den), den))


def ari(pred: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    """Adjusted Rand index over all pixels (ARI-A), one value per batch row.

    Args:
        pred: integer labels ``(B, H, W)`` or ``(B, T, H, W)``.
        true: integer labels, same shape. For video the whole sequence is one labeling.

    Returns:
        ``float64`` ``(B,)``. Matches ``sklearn.metrics.adjusted_rand_score(true_row, pred_row)``
        exactly, including its special cases (perfect agreement, a single pixel, both labelings a
        single cluster -> ``1.0``; one single cluster vs. all-distinct -> ``0.0``).
    """
    p, t = _check_labels(pred, true)
    return _ari_from_contingency(_contingency(p, t, foreground_only=False))


def fg_ari(pred: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    """Foreground ARI (ARI-O / FG-ARI): ARI restricted to pixels with ``true != 0``.

    For video, each object's pixels over the whole sequence form one cluster, so identity
    switches are penalised (per-sequence FG-ARI as in SAVi++ / Loci-s).

    Returns:
        ``float64`` ``(B,)``; equals ``adjusted_rand_score(true[fg], pred[fg])`` per row, except
        that a row without any foreground pixel is ``NaN`` (sklearn would return 1.0 for the empty
        labeling; NaN keeps such rows out of ``nanmean`` instead of rewarding them).
    """
    p, t = _check_labels(pred, true)
    c = _contingency(p, t, foreground_only=True)
    out = _ari_from_contingency(c)
    return torch.where(c.n == 0, torch.full_like(out, float("nan")), out)


# --------------------------------------------------------------------------------------
# AMI
# --------------------------------------------------------------------------------------
def _entropy(row: torch.Tensor, count: torch.Tensor, n: torch.Tensor, B: int) -> torch.Tensor:
    """Per-row Shannon entropy (nats) of cluster sizes ``count`` belonging to rows ``row``."""
    cnt = count.to(torch.float64)
    nr = n.to(torch.float64)[row]
    terms = -(cnt / nr) * (torch.log(cnt) - torch.log(nr))
    return torch.zeros(B, dtype=torch.float64, device=cnt.device).index_add_(0, row, terms)


def _expected_mutual_info(
    t_row: torch.Tensor,
    t_count: torch.Tensor,
    p_row: torch.Tensor,
    p_count: torch.Tensor,
    n: torch.Tensor,
    B: int,
) -> torch.Tensor:
    """Exact expected mutual information under the permutation (hypergeometric) model.

    ``EMI = sum_i sum_j sum_{k=max(1, a_i+b_j-N)}^{min(a_i, b_j)} (k/N) log(N k / (a_i b_j))
    * a_i! b_j! (N-a_i)! (N-b_j)! / (N! k! (a_i-k)! (b_j-k)! (N-a_i-b_j+k)!)``,
    evaluated with ``lgamma`` in float64 (same as sklearn's Cython ``expected_mutual_information``).

    Vectorisation: clusters of equal size give identical terms, so sizes are first reduced to
    unique ``(row, size)`` pairs with multiplicities; all ``(a, b)`` size pairs of the same row are
    enumerated with ``repeat_interleave`` and every pair expanded into its ragged ``k`` range
    (trimmed to where terms are non-zero in float64), so the whole batch is one flat tensor of
    terms (processed in memory chunks).
    """
    dev = n.device
    f64 = torch.float64

    def unique_sizes(row, count):
        key = row * (int(n.max()) + 1) + count
        ukey, mult = torch.unique(key, return_counts=True)
        return ukey // (int(n.max()) + 1), ukey % (int(n.max()) + 1), mult

    ta_row, ta, ta_mult = unique_sizes(t_row, t_count)
    pb_row, pb, pb_mult = unique_sizes(p_row, p_count)
    # pairs (a, b) within the same row: for each a-entry repeat over the b-entries of its row
    nb_per_row = torch.bincount(pb_row, minlength=B)
    b_offset = torch.cumsum(nb_per_row, 0) - nb_per_row
    rep = nb_per_row[ta_row]
    total_pairs = int(rep.sum())
    emi = torch.zeros(B, dtype=f64, device=dev)
    if total_pairs == 0:
        return emi
    ai = torch.repeat_interleave(torch.arange(ta.numel(), device=dev), rep)
    start = torch.repeat_interleave(torch.cumsum(rep, 0) - rep, rep)
    bj = b_offset[ta_row[ai]] + (torch.arange(total_pairs, device=dev) - start)
    pr_row = ta_row[ai]
    a = ta[ai]
    b = pb[bj]
    weight = (ta_mult[ai] * pb_mult[bj]).to(f64)
    N = n[pr_row]
    lo = torch.clamp(a + b - N, min=1)
    hi = torch.minimum(a, b)
    # Skip terms that are exactly 0 in float64 anyway: the hypergeometric count k is dominated
    # in convex order by a Binomial(a, b/N) (Hoeffding 1963), so Bernstein's inequality gives
    # P(|k - ab/N| >= s) <= 2 exp(-s^2 / (2 (var + s/3))) with var = a (b/N)(1 - b/N). We keep
    # the window where that bound exceeds exp(-1000); outside, every term is < 1e-430 (< the
    # smallest float64 subnormal), so the truncation changes nothing numerically.
    af, bf, Nf = a.to(f64), b.to(f64), N.to(f64)
    mean = af * bf / Nf
    var = af * (bf / Nf) * (1.0 - bf / Nf)
    c = 2000.0
    half = 0.5 * (c / 3.0 + torch.sqrt((c / 3.0) ** 2 + 4.0 * c * var))
    lo = torch.maximum(lo, torch.floor(mean - half).to(lo.dtype))
    hi = torch.minimum(hi, torch.ceil(mean + half).to(hi.dtype))
    length = torch.clamp(hi - lo + 1, min=0)

    # chunk pairs so that each chunk expands to at most ~_EMI_CHUNK terms
    csum = torch.cumsum(length, 0)
    total_terms = int(csum[-1])
    if total_terms == 0:
        return emi
    n_chunks = (total_terms + _EMI_CHUNK - 1) // _EMI_CHUNK
    bounds = torch.searchsorted(
        csum, torch.arange(1, n_chunks, device=dev, dtype=csum.dtype) * _EMI_CHUNK, right=True
    ).tolist()
    edges = [0] + bounds + [total_pairs]
    for s0, s1 in zip(edges[:-1], edges[1:]):
        if s1 <= s0:
            continue
        L = length[s0:s1]
        tot = int(L.sum())
        if tot == 0:
            continue
        idx = torch.repeat_interleave(torch.arange(s0, s1, device=dev), L)
        first = torch.repeat_interleave(torch.cumsum(L, 0) - L, L)
        k = (lo[idx] + (torch.arange(tot, device=dev) - first)).to(f64)
        ak, bk, Nk = a[idx].to(f64), b[idx].to(f64), N[idx].to(f64)
        lg = torch.lgamma
        log_p = (
            lg(ak + 1) + lg(bk + 1) + lg(Nk - ak + 1) + lg(Nk - bk + 1)
            - lg(Nk + 1) - lg(k + 1) - lg(ak - k + 1) - lg(bk - k + 1) - lg(Nk - ak - bk + k + 1)
        )
        term = (k / Nk) * (torch.log(Nk) + torch.log(k) - torch.log(ak) - torch.log(bk)) * torch.exp(log_p)
        emi.index_add_(0, pr_row[idx], term * weight[idx])
    return emi


def _mutual_info(c: _Contingency) -> torch.Tensor:
    """Per-row mutual information (nats): ``MI = sum_ij (n_ij / n) log(n n_ij / (a_i b_j))``.

    Same arrangement of logs, eps-zeroing of tiny terms and clipping at 0 as
    ``sklearn.metrics.mutual_info_score``.
    """
    mi = torch.zeros(c.B, dtype=torch.float64, device=c.n.device)
    if c.cell_row.numel() == 0:
        return mi
    nf = c.n.to(torch.float64)[c.cell_row]
    nij = c.cell_count.to(torch.float64)
    outer = (c.cell_a * c.cell_b).to(torch.float64)
    term = (nij / nf) * (torch.log(nij) - torch.log(nf)) + (nij / nf) * (-torch.log(outer) + 2.0 * torch.log(nf))
    term = torch.where(term.abs() < _EPS64, torch.zeros_like(term), term)
    return mi.index_add_(0, c.cell_row, term).clamp_min(0.0)


def ami(pred: torch.Tensor, true: torch.Tensor, foreground_only: bool = False) -> torch.Tensor:
    """Adjusted mutual information (AMI-A, or AMI-O with ``foreground_only=True``).

    ``AMI = (MI - E[MI]) / (mean(H(true), H(pred)) - E[MI])`` (arithmetic normalisation,
    sklearn's default ``average_method="arithmetic"``), with the exact expected MI under the
    permutation model (see :func:`_expected_mutual_info`).

    Args:
        pred, true: integer labels ``(B, H, W)`` or ``(B, T, H, W)`` (video: one labeling per
            sequence).
        foreground_only: restrict to pixels with ``true != 0``.

    Returns:
        ``float64`` ``(B,)`` matching ``sklearn.metrics.adjusted_mutual_info_score`` per row:
        both labelings a single cluster -> 1.0; exactly one of them a single cluster -> 0.0;
        numerator / denominator clamped away from 0 by float64 eps as sklearn does. Identical
        partitions are returned as exactly 1.0 (sklearn gets 1.0 there up to rounding, also for
        the degenerate all-pixels-distinct case where MI = H = E[MI]). Rows with no pixel
        (``foreground_only`` and no foreground) are ``NaN``.
    """
    p, t = _check_labels(pred, true)
    c = _contingency(p, t, foreground_only)
    mi = _mutual_info(c)
    B = c.B
    n = c.n
    kt, kp = c.n_clusters()
    n_cells = c.per_row(c.cell_row, torch.ones_like(c.cell_row))
    h_t = _entropy(c.t_row, c.t_count, n.clamp_min(1), B)
    h_p = _entropy(c.p_row, c.p_count, n.clamp_min(1), B)
    emi = _expected_mutual_info(c.t_row, c.t_count, c.p_row, c.p_count, n, B)
    denom = 0.5 * (h_t + h_p) - emi
    denom = torch.where(denom < 0, denom.clamp_max(-_EPS64), denom.clamp_min(_EPS64))
    numer = mi - emi
    numer = torch.where(numer < 0, numer.clamp_max(-_EPS64), numer.clamp_min(_EPS64))
    out = numer / denom
    one = torch.ones_like(out)
    identical = (n_cells == kt) & (n_cells == kp)
    out = torch.where(identical, one, out)
    out = torch.where((kt == 1) ^ (kp == 1), torch.zeros_like(out), out)
    out = torch.where((kt == 1) & (kp == 1), one, out)
    if foreground_only:
        out = torch.where(n == 0, torch.full_like(out, float("nan")), out)
    else:
        out = torch.where(n == 0, one, out)  # sklearn: empty labelings -> 1.0
    return out


# --------------------------------------------------------------------------------------
# matching-based metrics
# --------------------------------------------------------------------------------------
def _overlaps(pred: torch.Tensor, true: torch.Tensor):
    """Dense intersection / area tables over compact label ids.

    Args:
        pred, true: ``(B, F, P)`` int64 (``F`` frames, ``P`` pixels per frame).

    Returns:
        ``inter`` ``(B, F, Up, Ut)``, ``area_p`` ``(B, F, Up)``, ``area_t`` ``(B, F, Ut)`` (int64) and
        the label values ``p_vals`` ``(Up,)``, ``t_vals`` ``(Ut,)`` (shared across the batch).
    """
    B, Fr, P = pred.shape
    p_vals, p_id = torch.unique(pred, return_inverse=True)
    t_vals, t_id = torch.unique(true, return_inverse=True)
    up, ut = p_vals.numel(), t_vals.numel()
    bf = torch.arange(B * Fr, device=pred.device).view(B, Fr, 1)
    key = (bf * up + p_id) * ut + t_id
    inter = torch.bincount(key.reshape(-1), minlength=B * Fr * up * ut).view(B, Fr, up, ut)
    return inter, inter.sum(-1), inter.sum(-2), p_vals, t_vals


def _match(iou: np.ndarray) -> np.ndarray:
    """Hungarian matching maximising total IoU; returns per-column (true object) matched IoU."""
    out = np.zeros(iou.shape[1], dtype=np.float64)
    if iou.size == 0:
        return out
    r, c = linear_sum_assignment(iou, maximize=True)
    out[c] = iou[r, c]
    return out


def _frames(pred: torch.Tensor, true: torch.Tensor, per_frame: bool):
    if pred.shape != true.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and true {tuple(true.shape)} must have the same shape")
    if pred.dim() not in (3, 4):
        raise ValueError(f"labels must be (B, H, W) or (B, T, H, W), got {tuple(pred.shape)}")
    B = pred.shape[0]
    Fr = pred.shape[1] if (per_frame and pred.dim() == 4) else 1
    return pred.reshape(B, Fr, -1).long(), true.reshape(B, Fr, -1).long()


def _matched_ious(pred, true, per_frame, include_background, pred_background, min_pixels):
    """Per (row, frame-group) matched IoU of each present true object.

    Returns a nested list ``[row][frame] -> (matched_iou (n_true,), n_pred)`` on the CPU.
    """
    p, t = _frames(pred, true, per_frame)
    inter, area_p, area_t, p_vals, t_vals = _overlaps(p, t)
    union = area_p.unsqueeze(-1) + area_t.unsqueeze(-2) - inter
    iou = (inter.double() / union.clamp_min(1).double()).cpu().numpy()
    area_p = area_p.cpu().numpy()
    area_t = area_t.cpu().numpy()
    t_ok = np.ones(t_vals.numel(), dtype=bool) if include_background else (t_vals != 0).cpu().numpy()
    p_ok = np.ones(p_vals.numel(), dtype=bool)
    if pred_background is not None:
        p_ok &= (p_vals != pred_background).cpu().numpy()
    res = []
    for b in range(iou.shape[0]):
        frames = []
        for f in range(iou.shape[1]):
            tp = t_ok & (area_t[b, f] > 0)
            pp = p_ok & (area_p[b, f] >= max(min_pixels, 1))
            frames.append((_match(iou[b, f][np.ix_(pp, tp)]), int(pp.sum())))
        res.append(frames)
    return res


def miou(
    pred: torch.Tensor,
    true: torch.Tensor,
    per_frame: bool = False,
    include_background: bool = False,
) -> torch.Tensor:
    """Mean IoU of true objects after Hungarian matching to predicted segments.

    ``IoU(A, B) = |A n B| / (|A| + |B| - |A n B|)``. Predicted segments (every label present in
    ``pred``, none excluded) and true objects (labels present in ``true``, without ``0`` unless
    ``include_background``) are matched one-to-one by ``linear_sum_assignment`` maximising the
    summed IoU; an unmatched true object (more objects than segments) scores 0; the result is the
    mean over true objects present.

    * ``per_frame=False`` (default, per sequence): one assignment for the whole video, with
      intersections and areas summed over frames, so a prediction that swaps identities halfway
      is penalised.
    * ``per_frame=True``: for ``(B, T, H, W)`` each frame is matched separately; the per-frame
      mean over the objects visible in that frame is averaged over frames that contain at least
      one true object. Same as per sequence for images.

    Returns:
        ``float64`` ``(B,)``; ``NaN`` for a row without any true object.
    """
    res = _matched_ious(pred, true, per_frame, include_background, None, 1)
    out = []
    for frames in res:
        vals = [m.mean() for m, _ in frames if m.size > 0]
        out.append(float(np.mean(vals)) if vals else float("nan"))
    return torch.tensor(out, dtype=torch.float64, device=pred.device)


def f1(
    pred: torch.Tensor,
    true: torch.Tensor,
    iou_threshold: float = 0.5,
    pred_background: int | None = 0,
    min_pixels: int = 1,
    per_frame: bool = False,
) -> torch.Tensor:
    """Object-detection F1 after Hungarian matching.

    Predicted objects: segments with at least ``min_pixels`` pixels whose label is not
    ``pred_background`` (``None`` -> every segment is an object). True objects: non-zero labels
    present. Predicted and true objects are matched maximising summed IoU (as in :func:`miou`);
    a match with ``IoU >= iou_threshold`` is a true positive. ``precision = TP / n_pred``,
    ``recall = TP / n_true``, ``F1 = 2 TP / (n_pred + n_true)``. ``per_frame`` as in :func:`miou`
    (per-frame: ``TP``, ``n_pred`` and ``n_true`` are summed over frames).

    Returns:
        ``float64`` ``(B,)``; ``NaN`` for a row with neither predicted nor true objects.
    """
    res = _matched_ious(pred, true, per_frame, False, pred_background, min_pixels)
    out = []
    for frames in res:
        tp = sum(int((m >= iou_threshold).sum()) for m, _ in frames)
        n_true = sum(m.size for m, _ in frames)
        n_pred = sum(k for _, k in frames)
        out.append(2.0 * tp / (n_pred + n_true) if n_pred + n_true > 0 else float("nan"))
    return torch.tensor(out, dtype=torch.float64, device=pred.device)


def count_objects(labels: torch.Tensor, background: int | None = 0, min_pixels: int = 1) -> torch.Tensor:
    """Number of objects per row: distinct labels (excluding ``background``) covering at least
    ``min_pixels`` pixels over the whole image / sequence.

    Args:
        labels: integer labels ``(B, H, W)`` or ``(B, T, H, W)``.

    Returns:
        ``int64`` ``(B,)``.
    """
    B = labels.shape[0]
    flat = labels.reshape(B, -1).long()
    vals, ids = torch.unique(flat, return_inverse=True)
    row = torch.arange(B, device=flat.device).unsqueeze(1) * vals.numel()
    area = torch.bincount((row + ids).reshape(-1), minlength=B * vals.numel()).view(B, -1)
    present = area >= max(min_pixels, 1)
    if background is not None:
        present &= (vals != background).unsqueeze(0)
    return present.sum(-1)


def object_counting_accuracy(pred_count: torch.Tensor, true_count: torch.Tensor) -> torch.Tensor:
    """Per-row counting correctness ``float64(pred_count == true_count)`` ``(B,)``; its mean over
    rows is the OCA (fraction of samples whose object count is exactly right)."""
    return (torch.as_tensor(pred_count) == torch.as_tensor(true_count)).to(torch.float64)


def oca(
    pred: torch.Tensor, true: torch.Tensor, pred_background: int | None = 0, min_pixels: int = 1
) -> torch.Tensor:
    """Object counting accuracy per row from label maps.

    A predicted object is a segment with at least ``min_pixels`` pixels (after argmax, over the
    whole image / sequence) whose label is not ``pred_background``; true objects are the non-zero
    labels present in ``true``. Returns ``float64`` ``(B,)`` of 0/1; the mean is OCA.
    """
    if pred.shape != true.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and true {tuple(true.shape)} must have the same shape")
    return object_counting_accuracy(
        count_objects(pred, pred_background, min_pixels), count_objects(true, 0, 1)
    )


# --------------------------------------------------------------------------------------
# SSIM
# --------------------------------------------------------------------------------------
def _gaussian_window(size: int, sigma: float, dtype, device) -> torch.Tensor:
    x = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2.0
    g = torch.exp(-(x**2) / (2.0 * sigma**2))
    return g / g.sum()


def ssim(
    x: torch.Tensor,
    y: torch.Tensor,
    data_range: float = 1.0,
    window_size: int = 11,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
) -> torch.Tensor:
    """Structural similarity (Wang et al. 2004) with a Gaussian window.

    ``SSIM = (2 mu_x mu_y + C1)(2 sigma_xy + C2) / ((mu_x^2 + mu_y^2 + C1)(sigma_x^2 + sigma_y^2 + C2))``
    with ``C1 = (k1 L)^2``, ``C2 = (k2 L)^2``, ``L = data_range``; local statistics from a separable
    ``window_size`` x ``window_size`` Gaussian (sigma 1.5) via grouped ``conv2d`` without padding
    ("valid" positions only); the SSIM map is averaged over channels and positions. The window
    shrinks to the image size for images smaller than ``window_size``.

    Args:
        x, y: ``(B, C, H, W)`` images (RGB, depth, ...), or ``(B, T, C, H, W)`` videos (averaged
            over frames).

    Returns:
        ``(B,)`` in the input's floating dtype (at least float32).
    """
    if x.shape != y.shape:
        raise ValueError(f"x {tuple(x.shape)} and y {tuple(y.shape)} must have the same shape")
    if x.dim() == 5:
        B, T = x.shape[:2]
        return ssim(x.flatten(0, 1), y.flatten(0, 1), data_range, window_size, sigma, k1, k2).view(B, T).mean(1)
    if x.dim() != 4:
        raise ValueError(f"images must be (B, C, H, W) or (B, T, C, H, W), got {tuple(x.shape)}")
    dtype = torch.promote_types(x.dtype, torch.float32) if x.is_floating_point() else torch.float32
    x, y = x.to(dtype), y.to(dtype)
    B, C, H, W = x.shape
    ws = min(window_size, H, W)
    g = _gaussian_window(ws, sigma, dtype, x.device)
    wh = g.view(1, 1, ws, 1).expand(5 * C, 1, ws, 1)
    ww = g.view(1, 1, 1, ws).expand(5 * C, 1, 1, ws)
    stack = torch.cat([x, y, x * x, y * y, x * y], dim=1)
    filt = F.conv2d(F.conv2d(stack, wh, groups=5 * C), ww, groups=5 * C)
    mx, my, mxx, myy, mxy = filt.split(C, dim=1)
    vx, vy, cxy = mxx - mx * mx, myy - my * my, mxy - mx * my
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    smap = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return smap.flatten(1).mean(1)


# --------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------
def segmentation_report(
    pred_labels: torch.Tensor,
    true_labels: torch.Tensor,
    per_frame: bool = False,
    pred_background: int | None = 0,
    min_pixels: int = 1,
) -> dict[str, float]:
    """Batch means (``nanmean``) of the Loci-s table 2 columns.

    Keys: ``"AMI-A"``, ``"ARI-A"``, ``"AMI-O"``, ``"ARI-O"`` (foreground only), ``"IoU"``
    (:func:`miou`, ``per_frame`` as given), ``"F1"``, ``"OCA"``. ``pred_background`` and
    ``min_pixels`` define predicted objects for F1 and OCA. A column whose rows are all NaN is NaN.
    """
    cols = {
        "AMI-A": ami(pred_labels, true_labels),
        "ARI-A": ari(pred_labels, true_labels),
        "AMI-O": ami(pred_labels, true_labels, foreground_only=True),
        "ARI-O": fg_ari(pred_labels, true_labels),
        "IoU": miou(pred_labels, true_labels, per_frame=per_frame),
        "F1": f1(pred_labels, true_labels, pred_background=pred_background, min_pixels=min_pixels,
                 per_frame=per_frame),
        "OCA": oca(pred_labels, true_labels, pred_background=pred_background, min_pixels=min_pixels),
    }
    out = {}
    for k, v in cols.items():
        v = v.double()
        ok = ~torch.isnan(v)
        out[k] = float(v[ok].mean()) if bool(ok.any()) else math.nan
    return out
