"""The data config schema (`configs/data/*.yaml`), composed from the sections that each step
defines beside its rule (filters, extract, dedup, decontamination, tokenizer). Unknown keys and
impossible values are rejected before any work starts; paths are resolved relative to the config
file's directory, then the current directory, then the repository root."""
from __future__ import annotations

import glob
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from data_pipeline.dedup import DedupConfig
from data_pipeline.decontaminate import DecontaminationConfig
from data_pipeline.errors import PipelineError
from data_pipeline.extract import ExtractConfig
from data_pipeline.filters import FiltersConfig
from data_pipeline.schema import Section
from data_pipeline.tokenization import TokenizerConfig

REPO_ROOT = Path(__file__).resolve().parent.parent


class SourceConfig(Section):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_]*$")
    weight: float = Field(ge=0)
    format: Literal["warc", "wet", "wat", "wiki", "books", "jsonl"]
    inputs: list[str] = Field(min_length=1)
    text_field: str = "text"
    id_field: str = "id"
    url_field: str | None = "url"
    max_lines_without_text: int = Field(100, gt=0, description="JSONL: this many lines in a row without "
                                        "text_field fail the input (a wrong field name, not a few bad lines)")
    max_doc_chars: int = Field(1_000_000, gt=1000)
    strip_gutenberg: bool = True
    extract: ExtractConfig = ExtractConfig()
    filters: FiltersConfig = FiltersConfig()


class ShardConfig(Section):
    target_bytes: int = Field(256_000_000, gt=0)


class RayConfig(Section):
    num_cpus: int | None = Field(None, gt=0)
    max_retries: int = Field(3, ge=0)


class PipelineConfig(Section):
    output: str = "data/out"
    seed: int = 0
    tokenizer: TokenizerConfig = TokenizerConfig()
    sources: list[SourceConfig] = Field(min_length=1)
    dedup: DedupConfig = DedupConfig()
    decontamination: DecontaminationConfig = DecontaminationConfig()
    shards: ShardConfig = ShardConfig()
    ray: RayConfig = RayConfig()
    hash_inputs: bool = Field(False, description="a rerun compares inputs by sha256 too, not only by size and "
                                                 "modification time (reads every input once more)")

    @field_validator("sources")
    @classmethod
    def _unique_names(cls, sources: list[SourceConfig]) -> list[SourceConfig]:
        names = [s.name for s in sources]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"source names must be unique, repeated: {', '.join(dup)}")
        return sources

    @model_validator(mode="after")
    def _consistent(self) -> PipelineConfig:
        if sum(s.weight for s in self.sources) <= 0:
            raise ValueError("sources: at least one source needs a weight above 0")
        if self.tokenizer.vocab_size <= self.tokenizer.eot_id:
            raise ValueError("tokenizer.vocab_size: must be larger than tokenizer.eot_id")
        return self


def path_bases(config_dir: Path | None) -> list[Path]:
    bases = [config_dir, Path.cwd(), REPO_ROOT] if config_dir else [Path.cwd(), REPO_ROOT]
    return list(dict.fromkeys(b.resolve() for b in bases))


def resolve_file(path: str, bases: list[Path], key: str) -> Path:
    """The first existing file among `path` taken relative to each base (absolute paths as is)."""
    candidates = [Path(path)] if Path(path).is_absolute() else [b / path for b in bases]
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    tried = ", ".join(str(c) for c in candidates)
    raise PipelineError(f"{key}: file {path!r} not found (looked at {tried})")


def resolve_glob(pattern: str, bases: list[Path]) -> list[Path]:
    """Files matching `pattern` relative to the first base where it matches anything."""
    candidates = [Path(pattern)] if Path(pattern).is_absolute() else [b / pattern for b in bases]
    for candidate in candidates:
        found = sorted(Path(p).resolve() for p in glob.glob(str(candidate), recursive=True))
        files = [p for p in found if p.is_file()]
        if files:
            return files
    return []


def resolve_paths(config: PipelineConfig, config_dir: Path | None) -> PipelineConfig:
    """A copy of the config with every model/tokenizer/eval path made absolute (inputs are
    globs and are expanded later by the planner, which reports each missing one)."""
    bases = path_bases(config_dir)
    data = config.model_copy(deep=True)
    data.tokenizer.path = str(resolve_file(data.tokenizer.path, bases, "tokenizer.path"))
    data.decontamination.eval_sets = [str(resolve_file(p, bases, "decontamination.eval_sets"))
                                      for p in data.decontamination.eval_sets]
    for i, source in enumerate(data.sources):
        key = f"sources.{i}.filters"
        f = source.filters
        if f.language:
            f.language.model_path = str(resolve_file(f.language.model_path, bases, f"{key}.language.model_path"))
        if f.url and f.url.blocklist_file:
            f.url.blocklist_file = str(resolve_file(f.url.blocklist_file, bases, f"{key}.url.blocklist_file"))
        if f.quality_classifier:
            qc = f.quality_classifier
            qc.model_path = str(resolve_file(qc.model_path, bases, f"{key}.quality_classifier.model_path"))
    return data
