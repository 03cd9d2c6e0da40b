"""One rank of the scale tests (tests/trainer/test_scale.py), started by torchrun:
`python -m tests.trainer.scale_worker RUN_DIR OUT_DIR`. Builds the run's model and engine as the
trainer does, takes one optimizer step, saves a checkpoint, and writes what it measured to
OUT_DIR/rank-R.json: the RSS increase while the model was built and while the checkpoint was saved
(peaks: the kernel's high-water mark, reset before each, trainer/memory.py), and its live parameters
(OUT_DIR/live-rank-R.pt, unless ZeRO-3)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from trainer import checkpoint
from trainer.configio import read_run_config
from trainer.distributed import init_distributed, shutdown_distributed
from trainer.engine import build_engine, build_model
from trainer.memory import PeakMemory


def main(run_dir: Path, out: Path) -> None:
    init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = read_run_config(run_dir / "config.yaml").for_world(world)
    accum = cfg.gradient_accumulation
    construction = PeakMemory("cpu")
    model = build_model(cfg, world, accum)
    construction_increase = construction.peak()
    engine = build_engine(cfg, model, world, accum)
    t = cfg.train
    tokens = torch.randint(0, cfg.model.vocab_size, (t.micro_batch_size, t.seq_len + 1),
                           generator=torch.Generator().manual_seed(rank))
    for _ in range(accum):
        loss = engine(tokens[:, :-1], tokens[:, 1:]).loss
        engine.backward(loss)
        engine.step()
    layout = {"world_size": world, "zero_stage": cfg.parallel.zero_stage, "ep_size": cfg.parallel.ep_size}
    lower_bound = checkpoint.required_bytes(engine, run_dir / "checkpoints", cfg.parallel.ep_size)
    save = PeakMemory("cpu")
    checkpoint.save(engine, run_dir / "checkpoints", 1, {"step": 1}, (run_dir / "config.yaml").read_text(), 1, layout)
    save_increase = save.peak()
    written = sum(f.stat().st_size for f in (run_dir / "checkpoints" / "step-1").rglob("*") if f.is_file())
    if cfg.parallel.zero_stage != 3:
        live = {name: p.detach().clone() for name, p in engine.module.named_parameters()}
        torch.save({"params": live, "offsets": {name: getattr(p, "flat_offset", 0)
                                                for name, p in engine.module.named_parameters()}},
                   out / f"live-rank-{rank}.pt")
    (out / f"rank-{rank}.json").write_text(json.dumps({"construction_increase": construction_increase,
                                                       "save_increase": save_increase,
                                                       "disk_lower_bound": lower_bound, "disk_written": written}))
    shutdown_distributed()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
