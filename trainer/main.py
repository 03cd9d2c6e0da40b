"""One training process: `python -m trainer.main RUN_DIR` (RUN_DIR/config.yaml is the resolved
config that `pretrain train` wrote). Launchers start one per rank; it resumes from the newest
complete checkpoint in RUN_DIR/checkpoints by itself."""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator

from trainer import checkpoint, testing_hooks
from trainer.config import RunConfig
from trainer.configio import read_run_config
from trainer.data import TrainLoader, load_manifest, objective_for
from trainer.distributed import init_distributed, shutdown_distributed
from trainer.engine import build_engine, build_model
from trainer.errors import ConfigError, TrainError
from trainer.initialize import derived_seed
from trainer.logs import setup_logging, stdout_to_log
from trainer.malloc import keep_freed_memory, return_freed_memory
from trainer.memory import PeakMemory
from trainer.metrics import MetricsLogger, flops_for, moe_fields, progress_line
from trainer.schedule import accumulation_at, lr_at
from trainer.stability import SpikeMonitor
from trainer.watchdog import LAUNCHER_PID, exit_with_launcher

log = logging.getLogger("trainer")


class Trainer:
    def __init__(self, cfg: RunConfig, run_dir: Path):
        self.run_dir = run_dir
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.cfg = cfg = cfg.for_world(self.world)  # refuses a config saved for another world size
        self.full_accum = cfg.gradient_accumulation
        self.ckpt_root = run_dir / "checkpoints"
        self.layout = {"world_size": self.world, "zero_stage": cfg.parallel.zero_stage, "ep_size": cfg.parallel.ep_size}
        self.config_yaml = (run_dir / "config.yaml").read_text()
        self.memory = PeakMemory(get_accelerator().device_name())
        model = build_model(cfg, self.world, self.full_accum)
        self.engine = build_engine(cfg, model, self.world, self.full_accum)
        self.manifest = load_manifest(cfg.data.path, cfg.model.vocab_size, cfg.data.weights)
        self.objective = objective_for(cfg.train, self.manifest)
        if self.rank == 0:
            self._log_epochs()
        self.step, self.tokens, self.skipped, self.rollbacks = 0, 0, 0, {}
        self.spikes = SpikeMonitor(cfg.train.loss_spike_factor, cfg.train.loss_spike_patience)
        data_state = self._resume()
        self.loader = self._make_loader(data_state)
        self.metrics = MetricsLogger(run_dir, cfg, flops_for(cfg), enabled=self.rank == 0, resumed=self.step > 0)
        self.sample_log = self._open_sample_log()
        self.stop_requested = False
        if cfg.checkpoint.save_on_sigterm:
            signal.signal(signal.SIGTERM, self._on_sigterm)

    def _log_epochs(self) -> None:
        """GPT-3 Table 2.2 for this run: how often each source is seen in the tokens it will train on."""
        t = self.cfg.train
        budget = t.max_steps * t.global_batch_size * t.tokens_per_sequence
        for name, e in self.manifest.epochs(budget, self.cfg.data.heldout_percent).items():
            log.info("source %s: weight %.3f, %.3g tokens, %.3g drawn in %d steps: %.2f epochs", name, e["weight"],
                     e["tokens"], e["drawn"], t.max_steps, e["epochs"])
            if e["epochs"] > self.cfg.data.max_epochs:
                log.warning("source %s would be repeated %.1f times (data.max_epochs %g): lower its weight or add "
                            "data", name, e["epochs"], self.cfg.data.max_epochs)

    def _make_loader(self, data_state: Optional[dict]) -> TrainLoader:
        c = self.cfg
        return TrainLoader(self.manifest, self.objective, c.train.micro_batch_size, self.rank, self.world,
                           c.train.seed, c.data.heldout_percent, c.data.on_corrupt, c.data.num_workers, data_state)

    def _open_sample_log(self):
        if not self.cfg.logging.sample_log:
            return None
        path = self.run_dir / "samples" / f"rank-{self.rank}.jsonl"
        path.parent.mkdir(exist_ok=True)
        return open(path, "a", buffering=1)  # line-buffered: a killed run keeps what it logged

    def _on_sigterm(self, signum, frame) -> None:
        self.stop_requested = True  # acted on at the end of the current step, on every rank together

    def _resume(self) -> Optional[dict]:
        path = checkpoint.newest_valid(self.ckpt_root, warn=self.rank == 0)
        dist.barrier()
        if self.rank == 0:
            checkpoint.discard_incomplete(self.ckpt_root)
        if path is None:
            return None
        state = checkpoint.load(self.engine, path, self.layout)
        self._restore(state)
        log.info("resumed from %s (step %d, %d tokens)", path, self.step, self.tokens)
        return state["data"]

    def _restore(self, state: dict) -> None:
        self.step, self.tokens, self.skipped = state["step"], state["tokens"], state["skipped"]
        self.rollbacks = state["rollbacks"]
        self.spikes.load_state(state["spikes"])

    def _state(self) -> dict:
        return {"step": self.step, "tokens": self.tokens, "skipped": self.skipped, "rollbacks": self.rollbacks,
                "spikes": self.spikes.state(), "data": self.loader.state()}

    def save(self) -> Path:
        c = self.cfg.checkpoint
        path = checkpoint.save(self.engine, self.ckpt_root, self.step, self._state(), self.config_yaml,
                               c.keep_last, self.layout)
        log.info("saved checkpoint %s", path)
        return path

    def _set_schedule(self) -> int:
        t = self.cfg.train
        accum = accumulation_at(self.tokens, t, self.full_accum, self.world)
        if accum != self.engine.gradient_accumulation_steps():
            self.engine.set_train_batch_size(t.micro_batch_size * accum * self.world)
        lr = lr_at(self.tokens, t)
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr
        return accum

    def _micro_step(self, batch: torch.Tensor, k: int):
        # Dropout and router jitter drawn from the global micro-batch's index: the same whatever the layout.
        micro = self.cfg.train.micro_batch_size * self.cfg.train.tokens_per_sequence
        index = self.tokens // micro + k * self.world + self.rank
        torch.manual_seed(derived_seed(self.cfg.train.seed, "micro-batch", index))
        batch = batch.to(self.engine.device, non_blocking=True)  # the loader yields CPU tensors
        out = self.engine(*self.objective.split(batch))
        loss = out.loss
        if self.step + 1 == testing_hooks.nonfinite_step():
            loss = loss * float("nan")
        self.engine.backward(loss)
        self.engine.step()
        return loss.detach(), out

    def train_step(self) -> dict:
        """One optimizer step over `accum` micro-batches; returns the metrics record (all ranks agree)."""
        accum = self._set_schedule()
        lr = self.engine.optimizer.param_groups[0]["lr"]
        losses = torch.zeros(4)  # loss, ce, aux, z (summed over micro-batches)
        counts, dropped, moe_stats = None, None, []
        for k in range(accum):
            batch = self.loader.next()
            if self.sample_log:
                self.sample_log.write(json.dumps({"step": self.step + 1, "sha1": hashlib.sha1(
                    batch.numpy().tobytes()).hexdigest()}) + "\n")
            loss, out = self._micro_step(batch, k)
            # Step statistics live on the CPU (one small copy per micro-batch on a GPU).
            losses += torch.stack([loss, out.ce_loss.detach(), out.aux_loss.detach(), out.z_loss.detach()]).float().cpu()
            if out.moe:
                moe_stats = out.moe
                c = torch.stack([s.expert_counts.detach().float() for s in out.moe]).cpu()
                d = torch.stack([s.dropped_frac.detach().float() for s in out.moe]).cpu()
                counts, dropped = (c, d) if counts is None else (counts + c, dropped + d)
        return self._reduce(losses / accum, counts, dropped, moe_stats, accum, lr)

    def _reduce(self, losses, counts, dropped, moe_stats, accum: int, lr: float) -> dict:
        """One all-reduce per step: losses, the stop flag, and MoE statistics from every rank."""
        flags = torch.tensor([float(self.stop_requested)])
        parts = [losses / self.world, flags] + ([counts.flatten(), dropped / (accum * self.world)] if counts is not None else [])
        packed = torch.cat(parts).to(self.engine.device)  # NCCL reduces GPU tensors only
        dist.all_reduce(packed)
        packed = packed.cpu()
        loss, ce, aux, z = packed[:4].tolist()
        self.stop_requested = packed[4].item() > 0
        self.step += 1
        step_tokens = accum * self.cfg.train.micro_batch_size * self.cfg.train.tokens_per_sequence * self.world
        self.tokens += step_tokens
        finite = np.isfinite(loss)
        if not finite or not self.engine.was_step_applied():
            self.skipped += 1
            log.warning("step %d: non-finite loss or gradient (loss %s): update skipped (%d so far)",
                        self.step, loss, self.skipped)
        norm = self.engine.get_global_grad_norm()
        record = {"step": self.step, "tokens": self.tokens, "loss": loss, "ce_loss": ce, "lr": lr,
                  "grad_norm": float(norm) if norm is not None and np.isfinite(float(norm)) else None,
                  "batch_size": accum * self.cfg.train.micro_batch_size * self.world, "skipped_steps": self.skipped,
                  "tokens_by_source": self.loader.tokens_by_source()}
        if counts is not None:
            layers = [s.layer for s in moe_stats]
            global_counts = packed[5:5 + counts.numel()].view_as(counts)
            record.update(moe_fields(layers, global_counts, packed[5 + counts.numel():], aux, z))
        return record

    def _rollback(self) -> None:
        """PaLM's remedy: reload the last checkpoint's weights and optimizer but keep the data position,
        so the batches since that checkpoint are skipped."""
        path = checkpoint.newest_valid(self.ckpt_root, warn=False)
        if path is None:
            log.warning("step %d: loss spike, but there is no checkpoint to roll back to yet; continuing", self.step)
            self.spikes.reset()
            return
        if self.rollbacks.get(path.name, 0) >= 1:
            raise TrainError(f"loss spiked again after rolling back to {path.name} (train.loss_spike_factor="
                             f"{self.cfg.train.loss_spike_factor}): lower train.lr or check the data")
        rollbacks = {**self.rollbacks, path.name: self.rollbacks.get(path.name, 0) + 1}
        here = self.step
        state = checkpoint.load(self.engine, path, self.layout)
        self._restore(state)
        self.rollbacks = rollbacks
        self.spikes.reset()
        log.warning("loss spike for %d steps at step %d: rolled back to %s and skipped the %d steps of batches since",
                    self.cfg.train.loss_spike_patience, here, path.name, here - self.step)

    def run(self) -> int:
        t = self.cfg.train
        if self.rank == 0:
            log.info("training %s: %d processes, ZeRO-%d, ep_size %d, from step %d to %d", self.cfg.model.name,
                     self.world, self.cfg.parallel.zero_stage, self.cfg.parallel.ep_size, self.step, t.max_steps)
        if self.step == 0 and testing_hooks.save_at_start():
            self.save()
        last_saved = self.step
        while self.step < t.max_steps:
            start = time.perf_counter()
            record = self.train_step()
            record = self.metrics.log(record, time.perf_counter() - start, record["batch_size"] * t.tokens_per_sequence)
            if self.rank == 0 and self.step % self.cfg.logging.log_interval == 0:
                print(progress_line(record, t.max_steps), flush=True)
            if self.spikes.update(record["loss"]):
                self._rollback()
                continue
            if self.step % self.cfg.checkpoint.interval == 0 or self.stop_requested:
                self.save()
                last_saved = self.step
            if self.stop_requested:
                log.warning("stopped by SIGTERM at step %d; the checkpoint is saved, rerun to resume", self.step)
                return 0
            testing_hooks.after_step()
        if last_saved != self.step:
            self.save()
        return 0

    def close(self) -> None:
        record = self.memory.write(self.run_dir / "logs" / f"memory-rank{self.rank}.json")
        log.info("peak memory %.2f GB above the start (rank %d; RUN/logs/memory-rank*.json)",
                 record["peak_bytes"] / 1e9, self.rank)
        self.metrics.close()
        if self.sample_log:
            self.sample_log.close()


def train(run_dir: Path) -> int:
    """Train in this process (rank and world from the launcher's environment, or 0 of 1)."""
    cfg = read_run_config(run_dir / "config.yaml")
    setup_logging(int(os.environ.get("RANK", "0")), run_dir)
    with stdout_to_log("deepspeed"):
        init_distributed()
    if get_accelerator().device_name() == "cpu":  # trainer/malloc.py: speed, unless the layout is there to fit
        return_freed_memory() if cfg.parallel.zero_stage == 3 else keep_freed_memory()
    trainer = None
    try:
        trainer = Trainer(cfg, run_dir)
        return trainer.run()
    finally:
        if trainer is not None:
            trainer.close()
        shutdown_distributed()


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.main", description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", type=Path)
    args = parser.parse_args(argv)
    if LAUNCHER_PID in os.environ or "WORLD_SIZE" in os.environ:  # a rank: useless, and costly, without its launcher
        exit_with_launcher()
    try:
        return train(args.run_dir)
    except (TrainError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
