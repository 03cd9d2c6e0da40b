from pathlib import Path

import pytest
import yaml

from cluster.configio import ConfigError, load_config
from data_pipeline.config import PipelineConfig, resolve_paths
from data_pipeline.errors import PipelineError


def test_shipped_configs_load(repo_root):
    sample = load_config(repo_root / "configs/data/sample.yaml", PipelineConfig)
    assert sample.shards.target_bytes < 10_000_000
    fetched = load_config(repo_root / "configs/data/sample-fetched.yaml", PipelineConfig)
    assert [s.name for s in fetched.sources] == ["web", "books", "wiki"]
    gpt3 = load_config(repo_root / "configs/data/gpt3-mixture.yaml", PipelineConfig)
    assert {s.name: s.weight for s in gpt3.sources} == {"common_crawl": 0.60, "webtext2": 0.22, "books1": 0.08,
                                                         "books2": 0.08, "wikipedia": 0.03}
    assert gpt3.dedup.minhash.bands == 14 and gpt3.dedup.minhash.rows == 8


@pytest.mark.parametrize("change, message", [
    ({"sources": [{"name": "web", "weight": 1, "format": "warc", "inputs": ["x"], "filterz": {}}]}, "sources.0.filterz: unknown key"),
    ({"sources": [{"name": "web", "weight": 1, "format": "html", "inputs": ["x"]}]}, "sources.0.format"),
    ({"sources": [{"name": "a", "weight": 1, "format": "books", "inputs": ["x"]}] * 2}, "unique"),
    ({"shards": {"target_bytes": 0}}, "shards.target_bytes"),
])
def test_bad_configs_name_the_file_and_key(tmp_path, change, message):
    data = {"sources": [{"name": "web", "weight": 1, "format": "warc", "inputs": ["x"]}], **change}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as err:
        load_config(path, PipelineConfig)
    assert str(path) in str(err.value) and message in str(err.value)


def test_overrides_apply(repo_root):
    config = load_config(repo_root / "configs/data/sample.yaml", PipelineConfig, ["shards.target_bytes=1234", "seed=3"])
    assert config.shards.target_bytes == 1234 and config.seed == 3


def test_paths_resolve_against_config_dir_then_cwd(tmp_path, shared_data, monkeypatch):
    config_dir = tmp_path / "configs"
    config_dir.mkdir()
    (config_dir / "tok.tiktoken").write_bytes((shared_data / "tokenizer/gpt2/r50k_base.tiktoken").read_bytes())
    config = PipelineConfig.model_validate({"tokenizer": {"path": "tok.tiktoken"},
                                        "sources": [{"name": "b", "weight": 1, "format": "books", "inputs": ["x"]}]})
    assert resolve_paths(config, config_dir).tokenizer.path == str(config_dir / "tok.tiktoken")
    monkeypatch.chdir(config_dir)
    assert Path(resolve_paths(config, tmp_path).tokenizer.path) == config_dir / "tok.tiktoken"
    missing = config.model_copy(update={"tokenizer": config.tokenizer.model_copy(update={"path": "nope.tiktoken"})})
    with pytest.raises(PipelineError, match="tokenizer.path: file 'nope.tiktoken' not found"):
        resolve_paths(missing, config_dir)
