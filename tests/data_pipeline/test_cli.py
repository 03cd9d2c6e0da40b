"""End to end over ../shared/data through `pretrain data ...` (one shared in-process Ray run)."""
import json
import shutil

import pytest

from cluster.cli import main
from data_pipeline.report import check_counts
from data_pipeline.shards import iter_samples
from shard_format import load_encoding

pytestmark = pytest.mark.slow


def test_sample_run_decodes_and_counts_add_up(sample_run, shared_data):
    out, report, manifest = sample_run
    assert report["failed_inputs"] == []
    assert check_counts(report) == []
    assert set(manifest["sources"]) == {"web", "wet", "books", "wiki"}
    assert manifest["tokenizer"] == {"name": "gpt2", "vocab_size": 50257, "eot_id": 50256,
                                     "vocab_sha256": "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930",
                                     "vocab_file": str((shared_data / "tokenizer/gpt2/r50k_base.tiktoken").resolve())}
    wiki = report["sources"]["wiki"]["steps"]["read"]
    assert wiki["removed"]["read:redirect"] == 100 and wiki["docs_out"] == 106
    encoding = load_encoding(str(shared_data / "tokenizer/gpt2/r50k_base.tiktoken"))
    seen = {}
    for entry in manifest["shards"]:
        for key, tokens, meta in iter_samples(out / entry["path"]):
            assert key.startswith(entry["source"] + "-") and meta["tokens"] == tokens.size
            assert encoding.encode_ordinary(encoding.decode(tokens.tolist())) == tokens.tolist()
            seen[entry["source"]] = seen.get(entry["source"], 0) + 1
    assert seen["web"] >= 3 and seen["books"] >= 40 and seen["wiki"] >= 100


def test_verify_passes_then_fails_on_a_corrupted_byte(sample_run, tmp_path, capsys):
    out = sample_run[0]
    assert main(["data", "verify", str(out)]) == 0
    copy = tmp_path / "copy"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("_work"))
    shard = json.loads((copy / "manifest.json").read_text())["shards"][0]["path"]
    data = bytearray((copy / shard).read_bytes())
    data[len(data) // 3] ^= 0x01
    (copy / shard).write_bytes(bytes(data))
    capsys.readouterr()
    assert main(["data", "verify", str(copy)]) == 1
    assert f"FAIL {shard}" in capsys.readouterr().out


def test_stats_prints_per_source_and_filter_counts(sample_run, capsys):
    assert main(["data", "stats", str(sample_run[0]), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["sources"]["web"]["steps"]["language"]["docs_in"] > 0 and "epochs" not in stats
    assert main(["data", "stats", str(sample_run[0])]) == 0
    assert "gopher_quality" in capsys.readouterr().out


def test_stats_reports_epochs_per_source_for_a_token_budget(sample_run, capsys):
    """GPT-3 Table 2.2's last column, from the manifest's token counts and mixture weights."""
    manifest = json.loads((sample_run[0] / "manifest.json").read_text())
    tokens = {name: sum(s["tokens"] for s in manifest["shards"] if s["source"] == name) for name in manifest["sources"]}
    assert main(["data", "stats", str(sample_run[0]), "--json", "--tokens", "1e6"]) == 0
    epochs = json.loads(capsys.readouterr().out)["epochs"]
    weights = {name: src["weight"] for name, src in manifest["sources"].items()}
    for name, e in epochs.items():
        assert e["drawn"] == pytest.approx(1e6 * weights[name] / sum(weights.values()))
        assert e["epochs"] == pytest.approx(e["drawn"] / tokens[name])
    assert main(["data", "stats", str(sample_run[0]), "--tokens", "300e9"]) == 0
    out = capsys.readouterr().out
    assert "Epochs elapsed when training on 3e+11 tokens" in out and "would be repeated" in out


def test_user_errors_are_one_line(tmp_path, capsys):
    assert main(["data", "verify", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "no manifest" in err and "\n" not in err


def test_an_address_nobody_listens_on_is_refused_at_once(tmp_path, capsys, repo_root):
    import socket

    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert main(["data", "run", str(repo_root / "configs/data/sample.yaml"), "--out", str(tmp_path / "out"),
                 "--address", f"127.0.0.1:{port}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: --address 127.0.0.1:{port}: no Ray cluster answers there") and "\n" not in err
    assert not (tmp_path / "out").exists()
