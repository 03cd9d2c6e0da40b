"""Trainer fixtures: shards in exactly the DESIGN.md format (webdataset TarWriter, manifest.json),
built from the shared books and Wikipedia text with the GPT-2 BPE, without the data pipeline; and
helpers to write a run dir and run training in-process or as real processes."""
from __future__ import annotations

import bz2
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from trainer.distributed import free_port  # noqa: F401  (re-exported for the tests)

REPO = Path(__file__).resolve().parents[2]
FAKE_WANDB_KEY = "0123456789abcdef0123456789abcdef01234567"
TINY_TRAIN = {"seq_len": 64, "micro_batch_size": 4, "global_batch_size": 4, "lr": 3e-3, "warmup_tokens": 1024,
              "decay_tokens": 10 ** 6, "precision": "fp32", "max_steps": 10}


def gpt2_encoding(shared_data: Path):
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe
    from tiktoken_ext.openai_public import r50k_pat_str

    ranks = load_tiktoken_bpe(str(shared_data / "tokenizer" / "gpt2" / "r50k_base.tiktoken"))
    return tiktoken.Encoding("gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": 50256})


def book_documents(shared_data: Path, max_docs: int) -> list[str]:
    """Blocks of ~60 lines from two novels: documents of a few hundred tokens each."""
    docs = []
    for name in ("austen_emma.txt", "austen_persuasion.txt"):
        lines = (shared_data / "books" / name).read_text(errors="replace").splitlines()
        docs += ["\n".join(lines[i:i + 60]).strip() for i in range(0, len(lines), 60)]
    return [d for d in docs if d][:max_docs]


def wiki_documents(shared_data: Path, max_docs: int) -> list[str]:
    raw = bz2.decompress(next((shared_data / "wiki").glob("*.bz2")).read_bytes()).decode("utf-8", "replace")
    texts = re.findall(r"<text[^>]*>(.*?)</text>", raw, flags=re.S)
    return [t for t in texts if len(t) > 500 and not t.startswith("#REDIRECT")][:max_docs]


def write_shards(out: Path, sources: dict[str, list[list[int]]], shards_per_source: dict[str, int],
                 weights: dict[str, float] | None = None) -> dict:
    import webdataset as wds

    records = []
    for source, docs in sources.items():
        n = shards_per_source[source]
        (out / source).mkdir(parents=True, exist_ok=True)
        for s in range(n):
            path = out / source / f"shard-{s:06d}.tar"
            part = docs[s::n]
            with wds.TarWriter(str(path)) as w:
                for i, tokens in enumerate(part):
                    w.write({"__key__": f"{source}-{s:06d}-{i:06d}", "tokens.npy": np.array(tokens, dtype=np.uint16),
                             "json": {"id": f"{source}/{s}/{i}", "source": source, "tokens": len(tokens)}})
            data = path.read_bytes()
            records.append({"path": f"{source}/{path.name}", "source": source, "samples": len(part),
                            "tokens": sum(map(len, part)), "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    return {"format_version": 1,
            "tokenizer": {"name": "gpt2", "vocab_size": 50257, "eot_id": 50256, "vocab_sha256": "306cd27f"},
            "sources": {name: {"weight": w} for name, w in (weights or {"books": 0.7, "wiki": 0.3}).items()},
            "shards": records}


@pytest.fixture(scope="session")
def encoding(shared_data):
    return gpt2_encoding(shared_data)


@pytest.fixture(scope="session")
def shard_dir(tmp_path_factory, shared_data, encoding) -> Path:
    """books: 3 shards, wiki: 2 shards (fewer shards than some slot counts: exercises both splits)."""
    out = tmp_path_factory.mktemp("shards")
    sources = {"books": [encoding.encode_ordinary(d) for d in book_documents(shared_data, 300)],
               "wiki": [encoding.encode_ordinary(d)[:2000] for d in wiki_documents(shared_data, 60)]}
    manifest = write_shards(out, sources, {"books": 3, "wiki": 2})
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return out


@pytest.fixture(scope="session")
def recorded_shard_dir(tmp_path_factory, shard_dir, shared_data) -> Path:
    """shard_dir's shards, with the manifest recording the GPT-2 ranks file (path and sha256) as a data run
    does, so the tokenizer loads offline (sample, export)."""
    out = tmp_path_factory.mktemp("recorded")
    for source in ("books", "wiki"):
        (out / source).symlink_to(shard_dir / source)
    manifest = json.loads((shard_dir / "manifest.json").read_text())
    ranks = shared_data / "tokenizer" / "gpt2" / "r50k_base.tiktoken"
    manifest["tokenizer"].update(vocab_file=str(ranks), vocab_sha256=hashlib.sha256(ranks.read_bytes()).hexdigest())
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def make_run(run_dir: Path, data_dir: Path, model: str = "tiny-gpt", model_overrides: dict = None, **sections) -> Path:
    """Write RUN/config.yaml: the tiny model, TINY_TRAIN, and any section overrides."""
    model_cfg = yaml.safe_load((REPO / "configs" / "model" / f"{model}.yaml").read_text())
    model_cfg.update(model_overrides or {})
    cfg = {"model": model_cfg, "data": {"path": str(data_dir), "heldout_percent": 2.0},
           "train": dict(TINY_TRAIN), "parallel": {"zero_stage": 0},
           "checkpoint": {"interval": 1000}, "logging": {"wandb_mode": "disabled"}}
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    from trainer.config import RunConfig

    RunConfig.model_validate(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return run_dir


def read_metrics(run_dir: Path) -> dict[int, dict]:
    """step -> record; a step logged twice (after a resume) keeps its last record."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        out[r["step"]] = r
    return out


def launch_cmd(run_dir: Path, nproc: int, port: int) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "trainer.main", str(run_dir)]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
            f"--master_port={port}", "-m", "trainer.main", str(run_dir)]


LAUNCH_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def child_env() -> dict:
    """The test process's environment minus what an in-process run left for its own world of one."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    return env


def run_training(run_dir: Path, nproc: int = 1, port: int = 29611, timeout: float = 240) -> subprocess.CompletedProcess:
    proc = subprocess.run(launch_cmd(run_dir, nproc, port), env=child_env(), cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f"training failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
    return proc


def train_in_process(run_dir: Path) -> int:
    """Single-process training in the test process (saves the ~10 s of importing DeepSpeed again)."""
    from trainer.main import train

    saved = dict(os.environ)
    try:
        return train(run_dir)
    finally:
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture(scope="session")
def dense_run(tmp_path_factory, shard_dir) -> Path:
    """A tiny GPT that GPT-2 can express (dense attention), trained 30 steps with checkpoints at 15 and 30,
    wandb offline: shared by the checkpoint, metrics, eval and export tests."""
    run = make_run(tmp_path_factory.mktemp("dense") / "run", shard_dir, model_overrides={"attention": "dense"},
                   train={"max_steps": 30, "seq_len": 32}, checkpoint={"interval": 15, "keep_last": 1},
                   logging={"wandb_mode": "offline"})
    os.environ["WANDB_API_KEY"] = FAKE_WANDB_KEY  # must never reach a file in the run dir
    try:
        assert train_in_process(run) == 0
    finally:
        del os.environ["WANDB_API_KEY"]
    return run
