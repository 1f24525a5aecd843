"""Offline pre-training of Loci-s on recorded videos: ``python -m locis_rl.pretrain``.

Stages (paper sections 3.4-3.6 and 4), selectable with ``--stage`` and chained by ``--stage all``:

1. ``background`` - the uncertainty U-Net learns to predict the foreground mask (BCE), then the
   masked-autoencoder background extractor learns to reconstruct the background from the
   foreground-masked frame (loss on background pixels only).
2. ``objects`` - single-object encoder/decoder pretraining (3.5): the encoder sees the frame with
   every slot-specific input nullified except a 2-D Gaussian at a position derived from one
   object's mask (centroid, perturbed but kept inside the mask); the decoder must reproduce that
   object's mask (BCE on the mask logits) and its RGB / depth inside the mask.
   With ``stages.objects.context_steps > 0`` a second phase, ``objects/context``, follows (not in
   the paper): up to ``num_slots`` objects of an image at once, through the warm-up passes
   ``LociS.warmup`` makes, each pass encoding with the masks / RGB / depth the previous one
   decoded; every pass's visible masks are supervised by the instance masks. It teaches the
   encoder the slot-context channels the single-object phase leaves at zero.
3. ``proposal`` - the YOLACT-like proposal network (``proposal_loss``: Hungarian matching on IoU).
4. ``full`` - Loci-s on video sequences: ``LociS.step`` per frame (the first frame of a sequence
   runs ``model.assignment.warmup_train`` encoder/decoder-only warm-up passes inside ``step``),
   ``LociS.loss`` (reconstruction + next-frame prediction + percept-gate / GateL0RD L0 terms),
   truncated BPTT over windows of ``stages.full.bptt`` frames (``LociS.detach_state`` between
   windows, one optimiser update per window).
   With ``stages.full.long_steps > 0`` a second phase, ``full/long``, follows: the same training
   with a fresh optimiser and its own schedule (``long_schedule_steps``), as the shipped recipe does.

``--model savi`` (``model_family: savi``; presets ``savi-quickstart``, ``savi-gpu-budget``,
``savi-shipped``) trains the SAVi baseline instead, on the same data with the same machinery: one
stage, ``savi`` (:mod:`locis_rl.savi.train`), whose ``model.pt`` / ``metrics.json`` are SAVi's.

Usage::

    python -m locis_rl.pretrain                                    # quickstart preset, all stages
    python -m locis_rl.pretrain --preset savi-quickstart           # the SAVi baseline
    python -m locis_rl.pretrain --preset savi-shipped              # SAVi, shipped's data and CPU time (~3.2 h)
    python -m locis_rl.pretrain --preset shipped                   # the shipped model's recipe (CPU, ~3.5 h)
    python -m locis_rl.pretrain --preset gpu-long --data a.h5 b.h5 # the long GPU recipe, on your own files
    python -m locis_rl.pretrain --stage objects stages.objects.steps=500 model.num_slots=8
    python -m locis_rl.pretrain --resume runs/quickstart-20260101-120000
    python -m locis_rl.pretrain --export runs/shipped-full/checkpoint.pt model.pt  # weights of a stopped run
    torchrun --nproc_per_node 4 -m locis_rl.pretrain --preset gpu-long

Videos without segmentation masks
---------------------------------
Files recorded without ``segmentation`` still train, with label-free substitutes:

* foreground targets come from the temporal median of each episode
  (:func:`locis_rl.model.background.median_background_foreground`), which assumes a static camera
  and objects that move; objects standing still for the whole episode count as background, and
  shadows / lighting changes of moving objects count as foreground;
* the objects stage samples Gaussian positions inside connected components of that foreground
  and uses each component as the object's target mask, so touching or overlapping objects are
  learnt as one object, and objects hidden in the median (static) are never learnt;
* the proposal stage is skipped (it needs instance masks), so the ``seg`` slot assignment has
  no trained proposal network: the full stage trains with ``reg`` instead of ``seg`` and
  ``metrics.json`` reports ``rnd`` / ``reg`` only;
* without masks there are no segmentation metrics either: ``metrics.json`` holds the
  reconstruction metrics (SSIM / MSE) only.

Outputs in the run directory (``--run-dir``, default ``runs/<preset>-<timestamp>``): the atomic
``checkpoint.pt`` (model, optimiser with Lookahead state, scheduler, RNG states, phase and step,
config, format version; every ``checkpoint_every`` steps and at every phase end), ``tb/``
(TensorBoard: ``loss/...``, ``charts/...``), ``images/*.png`` (slot decompositions: input | masks
overlaid | reconstruction | background | slots), ``model.pt`` (``LociS.save_pretrained``) and
``metrics.json`` (:func:`locis_rl.evaluate.evaluate_model` on the held-out episodes).
"""
from __future__ import annotations

from locis_rl.pretrain.config import ConfigError, TrainConfig, load_train_config

__all__ = ["TrainConfig", "ConfigError", "load_train_config", "train", "main"]


def train(*args, **kwargs):
    from locis_rl.pretrain.run import train as _train

    return _train(*args, **kwargs)


def main(argv=None) -> int:
    from locis_rl.pretrain.__main__ import main as _main

    return _main(argv)
