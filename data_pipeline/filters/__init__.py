"""Filters, built from a source's `filters` section in their fixed order. Each filter's
thresholds are defined beside its rule, in its own module; `FiltersConfig` composes them."""
from __future__ import annotations

from data_pipeline.filters.c4 import C4Filter, C4FilterConfig
from data_pipeline.filters.fineweb import FineWebFilter, FineWebFilterConfig
from data_pipeline.filters.gopher import GopherQuality, GopherQualityConfig, GopherRepetition, GopherRepetitionConfig
from data_pipeline.filters.language import LanguageFilter, LanguageFilterConfig
from data_pipeline.filters.quality import QualityClassifierConfig, QualityClassifierFilter
from data_pipeline.filters.url import UrlBlocklist, UrlFilterConfig
from data_pipeline.schema import Section
from data_pipeline.step import Step


class FiltersConfig(Section):
    """Each filter runs when its section is present (`{}` = published defaults), in this order."""
    url: UrlFilterConfig | None = None
    language: LanguageFilterConfig | None = None
    gopher_repetition: GopherRepetitionConfig | None = None
    gopher_quality: GopherQualityConfig | None = None
    c4: C4FilterConfig | None = None
    fineweb: FineWebFilterConfig | None = None
    quality_classifier: QualityClassifierConfig | None = None


FILTER_STEPS = {"url": UrlBlocklist, "language": LanguageFilter, "gopher_repetition": GopherRepetition,
                "gopher_quality": GopherQuality, "c4": C4Filter, "fineweb": FineWebFilter}


def build_filters(config: FiltersConfig, seed: int) -> list[Step]:
    steps: list[Step] = []
    for name, section in config:  # pydantic iterates fields in declaration order: the run order
        if section is None:
            continue
        if name == "quality_classifier":  # the only one that samples, seeded by the run
            steps.append(QualityClassifierFilter(section, seed))
        else:
            steps.append(FILTER_STEPS[name](section))
    return steps
