"""The data config schema (`configs/data/*.yaml`). Unknown keys and impossible values are
rejected before any work starts; paths are resolved relative to the config file's directory,
then the current directory, then the repository root."""
from __future__ import annotations

import glob
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from data_pipeline.errors import PipelineError

REPO_ROOT = Path(__file__).resolve().parent.parent


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TokenizerConfig(Strict):
    name: Literal["gpt2"] = "gpt2"
    path: str = "../shared/data/tokenizer/gpt2/r50k_base.tiktoken"
    eot_id: int = 50256
    vocab_size: int = Field(50257, gt=0)


class ExtractConfig(Strict):
    """HTML to text (resiliparse). A page runs in a watchdog process so a pathological page
    costs at most `time_limit_s`; pages above `max_html_bytes` are cut to that size first."""
    time_limit_s: float = Field(5.0, gt=0)
    max_html_bytes: int = Field(2_000_000, gt=0)
    main_content: bool = True
    watchdog: bool = True


class UrlFilterConfig(Strict):
    builtin_blocklist: bool = True
    domains: list[str] = []
    blocklist_file: str | None = None


class LanguageFilterConfig(Strict):
    model_path: str = "../shared/data/langid/lid.176.ftz"
    languages: list[str] = ["en"]
    min_score: float = Field(0.65, ge=0, le=1)


class GopherRepetitionConfig(Strict):
    """Rae et al. 2021, Table A1."""
    dup_line_frac: float = 0.30
    dup_para_frac: float = 0.30
    dup_line_char_frac: float = 0.20
    dup_para_char_frac: float = 0.20
    top_ngram_char_frac: dict[int, float] = {2: 0.20, 3: 0.18, 4: 0.16}
    dup_ngram_char_frac: dict[int, float] = {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10}


class GopherQualityConfig(Strict):
    """Rae et al. 2021, Appendix A.1.1."""
    min_words: int = 50
    max_words: int = 100_000
    min_avg_word_length: float = 3
    max_avg_word_length: float = 10
    max_symbol_word_ratio: float = 0.1
    max_bullet_lines_ratio: float = 0.9
    max_ellipsis_lines_ratio: float = 0.3
    min_alpha_words_ratio: float = 0.8
    min_stop_words: int = 2
    stop_words: list[str] = ["the", "be", "to", "of", "and", "that", "have", "with"]


class C4FilterConfig(Strict):
    """Raffel et al. 2020, Section 2.2 (line filters rewrite the text, page filters remove it)."""
    min_sentences: int = 5
    min_words_per_line: int = 3
    max_word_length: int = 1000
    require_terminal_punct: bool = True
    remove_citations: bool = True
    drop_lorem_ipsum: bool = True
    drop_javascript_lines: bool = True
    drop_curly_bracket: bool = True
    drop_policy_lines: bool = True


class FineWebFilterConfig(Strict):
    """Penedo et al. 2024, FineWeb's three custom rules."""
    line_punct_ratio: float = 0.12
    short_line_ratio: float = 0.67
    short_line_length: int = 30
    char_dup_ratio: float = 0.01
    newline_word_ratio: float = 0.3


class QualityClassifierConfig(Strict):
    """GPT-3 (Brown et al. 2020, App. A): keep when pareto(alpha) > 1 - score."""
    model_path: str
    pareto_alpha: float = Field(9.0, gt=0)


class FiltersConfig(Strict):
    """Each filter runs when its section is present (`{}` = published defaults), in this order."""
    url: UrlFilterConfig | None = None
    language: LanguageFilterConfig | None = None
    gopher_repetition: GopherRepetitionConfig | None = None
    gopher_quality: GopherQualityConfig | None = None
    c4: C4FilterConfig | None = None
    fineweb: FineWebFilterConfig | None = None
    quality_classifier: QualityClassifierConfig | None = None


class SourceConfig(Strict):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_]*$")
    weight: float = Field(ge=0)
    format: Literal["warc", "wet", "wat", "wiki", "books", "jsonl"]
    inputs: list[str] = Field(min_length=1)
    text_field: str = "text"
    id_field: str = "id"
    url_field: str | None = "url"
    max_doc_chars: int = Field(1_000_000, gt=1000)
    strip_gutenberg: bool = True
    extract: ExtractConfig = ExtractConfig()
    filters: FiltersConfig = FiltersConfig()


class MinHashConfig(Strict):
    enabled: bool = True
    ngram: int = Field(5, gt=0)
    bands: int = Field(14, gt=0)
    rows: int = Field(8, gt=0)
    seed: int = 1


class DedupConfig(Strict):
    exact: bool = True
    minhash: MinHashConfig = MinHashConfig()


class DecontaminationConfig(Strict):
    eval_sets: list[str] = []
    text_field: str = "text"
    ngram: int = Field(13, gt=0)


class ShardConfig(Strict):
    target_bytes: int = Field(256_000_000, gt=0)


class RayConfig(Strict):
    num_cpus: int | None = Field(None, gt=0)
    max_retries: int = Field(3, ge=0)


class DataConfig(Strict):
    output: str = "data/out"
    seed: int = 0
    tokenizer: TokenizerConfig = TokenizerConfig()
    sources: list[SourceConfig] = Field(min_length=1)
    dedup: DedupConfig = DedupConfig()
    decontamination: DecontaminationConfig = DecontaminationConfig()
    shards: ShardConfig = ShardConfig()
    ray: RayConfig = RayConfig()

    @field_validator("sources")
    @classmethod
    def _unique_names(cls, sources: list[SourceConfig]) -> list[SourceConfig]:
        names = [s.name for s in sources]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"source names must be unique, repeated: {', '.join(dup)}")
        return sources

    @model_validator(mode="after")
    def _consistent(self) -> DataConfig:
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


def resolve_paths(config: DataConfig, config_dir: Path | None) -> DataConfig:
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
