"""The training loop: phases, checkpoints, logging, images, DDP, final model and metrics."""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import datetime as _dt
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from locis_rl.devices import resolve_device
from locis_rl.model.config import ConfigError
from locis_rl.pretrain.checkpointing import (CHECKPOINT_NAME, ResumeError, load_train_checkpoint, rng_state,
                                             save_train_checkpoint, set_rng_state)
from locis_rl.pretrain.config import TrainConfig, apply_train_overrides
from locis_rl.pretrain.data import EpisodeStore, StepSampler, resolve_data_paths
from locis_rl.pretrain.optim import build_optimizer, build_scheduler
from locis_rl.pretrain.stages import (FullStage, build_stage, phase_batch_size, phase_lr_scale, phase_max_seconds,
                                      phase_schedule_steps, phase_steps, phases_for)
from locis_rl.savi import train as savi_train

__all__ = ["train", "TrainResult", "default_run_dir"]


@dataclass
class TrainResult:
    run_dir: Path
    completed: bool
    """False when ``stop_after_steps`` ended the invocation early."""
    global_step: int
    losses: list[float]
    """Loss of every optimiser step of this invocation on this rank (reproducibility checks)."""
    metrics: dict[str, Any] | None = None


def default_run_dir(preset: str) -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{preset}-{stamp}"


class _Dist:
    def __init__(self, cfg: TrainConfig):
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.enabled = self.world_size > 1
        try:
            device = resolve_device(cfg.device)
            if device.type == "cuda" and device.index is None:
                # Under torchrun each rank takes its own GPU unless the config names one.
                device = resolve_device(f"cuda:{self.local_rank}")
        except ValueError as exc:
            raise ConfigError(f"{exc} (config key device=..., LOCAL_RANK={self.local_rank})") from None
        self.device = device
        if device.type == "cuda":
            torch.cuda.set_device(device)
        self.owns_group = False
        if self.enabled and not dist.is_initialized():
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            dist.init_process_group(backend=backend, timeout=_dt.timedelta(minutes=30))
            self.owns_group = True

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


# model_family=savi: one phase, "savi" (locis_rl/savi/train.py); everything else is shared
def _phases(cfg: TrainConfig, stage: str) -> list[str]:
    return savi_train.phases_for(stage) if cfg.model_family == "savi" else phases_for(stage, cfg)


def _build_model(cfg: TrainConfig) -> nn.Module:
    if cfg.model_family == "savi":
        from locis_rl.savi import SAVi

        return SAVi(cfg.model)
    from locis_rl.model import LociS

    return LociS(cfg.model)


def _step_seed(seed: int, phase_index: int, step: int, rank: int) -> int:
    return (int(seed) * 1_000_003 + phase_index * 10_000_019 + step * 7_919 + rank * 104_729) % (2 ** 62)


class Trainer:
    def __init__(self, cfg: TrainConfig, *, stage: str = "all", run_dir: str | os.PathLike | None = None,
                 resume: str | os.PathLike | None = None, init: str | os.PathLike | None = None,
                 overrides: dict[str, Any] | None = None, log: Callable[[str], None] | None = None):
        self.ckpt: dict[str, Any] | None = None
        if resume is not None:
            self.ckpt = load_train_checkpoint(resume)
            saved = TrainConfig.from_dict(self.ckpt["config"])
            cfg = apply_train_overrides(saved, overrides)
            run_dir = Path(resume) if Path(resume).is_dir() else Path(resume).parent
            stage = self.ckpt.get("stage", stage)
        self.cfg = cfg
        self.stage = stage
        _phases(cfg, stage)  # validates the name early
        self.dist = _Dist(cfg)
        self.run_dir = Path(run_dir) if run_dir is not None else default_run_dir(cfg.preset)
        self._log = log or (lambda msg: print(f"[pretrain] {msg}", file=sys.stderr, flush=True))
        if cfg.num_threads > 0:
            torch.set_num_threads(cfg.num_threads)
        self.init = init

    def log(self, msg: str) -> None:
        if self.dist.is_main:
            self._log(msg)

    # ------------------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        cfg, d = self.cfg, self.dist
        paths = (self.ckpt["data_paths"] if self.ckpt is not None and not cfg.data.paths and self.ckpt.get("data_paths")
                 else None)
        if paths is not None and not all(os.path.exists(p) for p in paths):
            # resumed on another machine (or after the cache was cleared): the preset's recording is
            # seeded, so it is recorded again where this machine caches data
            self.log(f"the checkpoint's cached data {paths} is not here; recording it again")
            paths = None
        if paths is None:
            paths = resolve_data_paths(cfg, is_main=d.is_main, barrier=d.barrier, log=self.log)
        self.store = EpisodeStore(paths, cfg)
        if d.is_main:  # only once the data is there: a failed start leaves no empty run directory
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "images").mkdir(exist_ok=True)
            with open(self.run_dir / "config.json", "w") as f:
                json.dump({"stage": self.stage, **cfg.to_dict()}, f, indent=2)
        phases = _phases(cfg, self.stage)
        if not self.store.has_segmentation and "proposal" in phases:
            phases.remove("proposal")
            self.log("the data has no segmentation masks: skipping the proposal stage "
                     "(foreground targets come from the temporal median; evaluate with rnd/reg)")
        if self.ckpt is not None and list(self.ckpt["phases"]) != phases:
            raise ResumeError(f"checkpoint phases {self.ckpt['phases']} do not match this run's {phases}")

        torch.manual_seed(cfg.seed)
        model = _build_model(cfg).to(d.device)
        if self.init is not None and self.ckpt is None:
            self._load_init(model, self.init)
        phase_index, step, global_step = 0, 0, 0
        if self.ckpt is not None:
            model.load_state_dict(self.ckpt["model"])
            phase_index, step = int(self.ckpt["phase_index"]), int(self.ckpt["step"])
            global_step = int(self.ckpt.get("global_step", 0))
            if "rng" in self.ckpt:
                set_rng_state(self.ckpt["rng"])
            self.log(f"resuming {self.run_dir} at phase {phase_index}/{len(phases)} "
                     f"({phases[phase_index] if phase_index < len(phases) else 'done'}) step {step}")
        self.model = model
        self.phases = phases
        self.paths = paths
        self.writer = None
        if d.is_main:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(self.run_dir / "tb"))
        self.losses: list[float] = []
        self.steps_this_run = 0
        # Training seconds per phase, summed over every invocation of the run: a resumed phase spends
        # only what is left of its `max_minutes`, and the budget a run reports excludes the time it
        # spent stopped between invocations.
        self.phase_seconds: dict[str, float] = {
            k: float(v) for k, v in (self.ckpt or {}).get("phase_seconds", {}).items()}
        self.last_checkpoint_time = time.perf_counter()
        if d.enabled:
            print(f"[pretrain rank {d.rank}/{d.world_size}] started on {d.device}", file=sys.stderr, flush=True)
        completed = True
        try:
            for pi in range(phase_index, len(phases)):
                start = step if pi == phase_index else 0
                opt_state = self.ckpt if (self.ckpt is not None and pi == phase_index and start > 0) else None
                done, global_step = self._run_phase(pi, phases[pi], start, global_step, opt_state)
                if not done:
                    completed = False
                    break
            metrics = None
            if completed:
                metrics = self._finish(global_step)
            if d.enabled:
                print(f"[pretrain rank {d.rank}/{d.world_size}] ran {self.steps_this_run} steps",
                      file=sys.stderr, flush=True)
        finally:
            if self.writer is not None:
                self.writer.close()
            d.close()
        return TrainResult(self.run_dir, completed, global_step, self.losses, metrics if completed else None)

    # ------------------------------------------------------------------------------------------
    def _load_init(self, model: nn.Module, path: str | os.PathLike) -> None:
        from locis_rl.evaluate import load_model

        src = load_model(path)
        if src.config.to_dict() != model.config.to_dict():
            raise ResumeError(f"--init {path}: its model config differs from this run's "
                              f"(use the same model preset / model.* overrides)")
        model.load_state_dict(src.state_dict())
        self.log(f"initialised the model from {path}")

    def _checkpoint(self, phase_index: int, step: int, global_step: int, optimizer, scheduler) -> None:
        self.last_checkpoint_time = time.perf_counter()
        if not self.dist.is_main:
            return
        save_train_checkpoint(self.run_dir / CHECKPOINT_NAME, {
            "config": self.cfg.to_dict(),
            "stage": self.stage,
            "phases": self.phases,
            "phase_index": phase_index,
            "step": step,
            "global_step": global_step,
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "optimizer": optimizer.state_dict() if optimizer is not None else None,
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "rng": rng_state(),
            "phase_seconds": dict(self.phase_seconds),
            "data_paths": list(self.paths),
            "world_size": self.dist.world_size,
        })

    def _autocast(self):
        if self.dist.device.type == "cuda" and self.cfg.amp:
            return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _run_phase(self, pi: int, phase: str, start: int, global_step: int, resume_ckpt) -> tuple[bool, int]:
        cfg, d, model, store = self.cfg, self.dist, self.model, self.store
        savi = phase == savi_train.PHASE
        total = cfg.stages.savi.steps if savi else phase_steps(cfg, phase)
        if start >= total:
            return True, global_step
        stage = savi_train.SAViStage(model, cfg) if savi else build_stage(phase, model, cfg)
        if isinstance(stage, FullStage) and not store.has_segmentation and model.config.assignment.mode == "seg":
            stage.mode = "reg"  # no proposal network was trained on this data
            self.log("full stage: no segmentation in the data, training with slot assignment 'reg'")
        params = stage.freeze_others()
        module: nn.Module = stage
        if d.enabled:
            module = nn.parallel.DistributedDataParallel(
                stage, device_ids=[d.device.index] if d.device.type == "cuda" else None,
                find_unused_parameters=False)  # StageModule.forward touches every trained parameter
        optim_cfg = dataclasses.replace(cfg.optim, lr=cfg.optim.lr * phase_lr_scale(cfg, phase))
        optimizer = build_optimizer(params, optim_cfg)
        scheduler = build_scheduler(optimizer, optim_cfg, total if savi else phase_schedule_steps(cfg, phase))
        if resume_ckpt is not None and resume_ckpt.get("optimizer") is not None:
            optimizer.load_state_dict(resume_ckpt["optimizer"])
            scheduler.load_state_dict(resume_ckpt["scheduler"])
        batch_size = cfg.stages.savi.batch_size if savi else phase_batch_size(cfg, phase)
        sampler = StepSampler(store.train_ids, batch_size, seed=cfg.seed + 101 * pi,
                              rank=d.rank, world_size=d.world_size)
        self.log(f"phase {pi + 1}/{len(self.phases)} {phase}: steps {start}..{total} "
                 f"({sum(p.numel() for p in params):,} trained parameters, {d.world_size} process(es))")
        bar = None
        if d.is_main and cfg.progress:
            from tqdm import tqdm

            bar = tqdm(total=total, initial=start, desc=phase, dynamic_ncols=True, file=sys.stderr)
        model.train()
        t_last, frames_since = time.perf_counter(), 0
        max_seconds = phase_max_seconds(cfg, phase)
        spent_before = self.phase_seconds.get(phase, 0.0) if start > 0 else 0.0
        t_phase = time.perf_counter()

        def record_time() -> None:
            self.phase_seconds[phase] = spent_before + time.perf_counter() - t_phase

        deadline = t_phase + max_seconds - spent_before if max_seconds > 0 else None
        for step in range(start, total):
            if deadline is not None and self._out_of_time(deadline):
                self.log(f"phase {phase}: time budget of {max_seconds / 60:g} min used up after "
                         f"{step} steps ({step - start} in this invocation); ending the phase here")
                break
            seed = _step_seed(cfg.seed, pi, step, d.rank)
            torch.manual_seed(seed)
            gen = torch.Generator().manual_seed(seed)
            items = sampler.indices(step)
            batch = stage.sample(store, items, gen).to(d.device)
            frames = batch.rgb.shape[0] * batch.rgb.shape[1]
            if isinstance(stage, (FullStage, savi_train.SAViStage)):
                loss_value, logs = self._full_step(module, stage, batch, optimizer, seed)
            else:
                with self._autocast():
                    loss, logs = module(batch, generator=gen)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self._clip(params)
                optimizer.step()
                loss_value = float(loss.detach())
            scheduler.step()
            if not math.isfinite(loss_value):
                raise FloatingPointError(f"{phase}: loss became {loss_value} at step {step}")
            self.losses.append(loss_value)
            global_step += 1
            self.steps_this_run += 1
            frames_since += frames * d.world_size
            if bar is not None:
                bar.update(1)
            if d.is_main and (cfg.log_every and (step + 1) % cfg.log_every == 0 or step + 1 == total):
                now = time.perf_counter()
                fps = frames_since / max(now - t_last, 1e-9)
                t_last, frames_since = now, 0
                self.writer.add_scalar(f"loss/{phase}", loss_value, global_step)
                for k, v in logs.items():
                    self.writer.add_scalar(k, float(v), global_step)
                self.writer.add_scalar("charts/lr", optimizer.param_groups[0]["lr"], global_step)
                self.writer.add_scalar("charts/frames_per_second", fps, global_step)
                self.writer.add_scalar("charts/phase", pi, global_step)
                if bar is not None:
                    bar.set_postfix(loss=f"{loss_value:.4f}", fps=f"{fps:.1f}")
            if d.is_main and cfg.image_every and (step + 1) % cfg.image_every == 0:
                self._images(f"{pi}-{phase.replace('/', '-')}_step{step + 1:06d}")
            due = cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0
            due = due or (cfg.checkpoint_minutes > 0
                          and time.perf_counter() - self.last_checkpoint_time >= 60.0 * cfg.checkpoint_minutes)
            if due and step + 1 < total:
                record_time()
                self._checkpoint(pi, step + 1, global_step, optimizer, scheduler)
            if self.cfg.stop_after_steps and self.steps_this_run >= self.cfg.stop_after_steps:
                if bar is not None:
                    bar.close()
                self.log(f"stop_after_steps={self.cfg.stop_after_steps} reached: stopping like a killed "
                         f"process (steps since the last checkpoint are lost)")
                return False, global_step
        if bar is not None:
            bar.close()
        record_time()
        if d.is_main:
            self._images(f"{pi}-{phase.replace('/', '-')}_end")
        self._checkpoint(pi + 1, 0, global_step, None, None)
        model.requires_grad_(True)
        del module, optimizer, scheduler
        gc.collect()  # drop this phase's DDP reducer (and its autograd hooks) before the next one
        return True, global_step

    def _out_of_time(self, deadline: float) -> bool:
        """Whether the phase's wall-clock budget is spent; all ranks agree (rank 0's clock wins)."""
        over = torch.tensor([float(time.perf_counter() > deadline)], device=self.dist.device)
        if self.dist.enabled:
            dist.broadcast(over, src=0)
        return bool(over.item())

    def _clip(self, params) -> None:
        if self.cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, self.cfg.optim.grad_clip)

    def _full_step(self, module, stage: FullStage, batch, optimizer, seed: int):
        """One training sequence: truncated BPTT windows, one optimiser update per window."""
        model, cfg = self.model, self.cfg
        B, T = batch.rgb.shape[:2]
        state = model.init_state(B, self.dist.device, seed=seed)
        window = stage.bptt if isinstance(stage, savi_train.SAViStage) else cfg.stages.full.bptt
        total, n = 0.0, 0
        logs: dict[str, Any] = {}
        for t0 in range(0, T, window):
            with self._autocast():
                loss, logs, state = module(batch, state=state, t0=t0, t1=min(T, t0 + window))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self._clip(stage.freeze_params)
            optimizer.step()
            state = model.detach_state(state)
            total += float(loss.detach())
            n += 1
        return total / max(n, 1), logs

    @torch.no_grad()
    def _images(self, tag: str) -> None:
        """Slot decomposition of the first held-out episode (first few frames) as a PNG."""
        import numpy as np

        from locis_rl.model.depth_input import scene_relative_depth
        from locis_rl.pretrain.visualize import frame_from_output, save_png

        model = self.model
        was_training = model.training
        model.eval()
        try:
            ep = self.store.episode(self.store.eval_ids[0])
            if self.cfg.model_family == "savi":
                frames = savi_train.decomposition_frames(model, ep, self.dist.device, seed=self.cfg.seed)
                save_png(np.concatenate(frames, axis=0), self.run_dir / "images" / f"{tag}.png")
                return
            rgb = ep["rgb"].to(self.dist.device)
            depth = ep.get("depth")
            depth = depth.to(self.dist.device) if depth is not None else None
            state = model.init_state(1, self.dist.device, seed=self.cfg.seed)
            frames = []
            for t in range(min(3, rgb.shape[0])):
                d_t = depth[t:t + 1] if depth is not None else None
                mode = model.config.assignment.mode if self.store.has_segmentation else "reg"
                out, state = model.step(rgb[t:t + 1], d_t if model.config.use_depth else None, state, mode=mode)
                disp = scene_relative_depth(d_t) if d_t is not None else None
                frames.append(frame_from_output(out, 0, rgb[t:t + 1], disp))
            save_png(np.concatenate(frames, axis=0), self.run_dir / "images" / f"{tag}.png")
        finally:
            model.train(was_training)

    def _finish(self, global_step: int) -> dict[str, Any] | None:
        d = self.dist
        metrics = None
        if d.is_main:
            path = self.model.save_pretrained(self.run_dir / "model.pt")
            self.log(f"saved the model to {path}")
            if self.cfg.eval.enabled:
                from torch.utils.data import Subset

                from locis_rl.evaluate import evaluate_model, format_table, write_json

                modes = [m for m in self.cfg.eval.modes if self.store.has_segmentation or m != "seg"]
                eval_set = Subset(self.store.dataset, self.store.eval_ids)
                metrics = evaluate_model(self.model, eval_set, modes, max_sequences=self.cfg.eval.max_sequences,
                                         seed=self.cfg.seed, out_dir=self.run_dir / "images" / "eval",
                                         visualize=1, device=d.device)
                metrics.update({"split": "held-out", "episodes": len(self.store.eval_ids),
                                "data": list(self.paths), "global_step": global_step, "stage": self.stage,
                                "phase_seconds": {k: round(v, 1) for k, v in self.phase_seconds.items()}})
                write_json(metrics, self.run_dir / "metrics.json")
                self.log("held-out metrics:\n" + format_table(metrics))
        d.barrier()
        return metrics


def train(cfg: TrainConfig, *, stage: str = "all", run_dir: str | os.PathLike | None = None,
          resume: str | os.PathLike | None = None, init: str | os.PathLike | None = None,
          overrides: dict[str, Any] | None = None, log: Callable[[str], None] | None = None) -> TrainResult:
    """Train ``stage`` (``background | objects | proposal | full | all``; ``savi | all`` with
    ``cfg.model_family == "savi"``); see the package doc."""
    return Trainer(cfg, stage=stage, run_dir=run_dir, resume=resume, init=init, overrides=overrides,
                   log=log).run()
