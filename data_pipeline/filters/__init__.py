"""Filters, built from a source's `filters` section in their fixed order."""
from __future__ import annotations

from data_pipeline.config import FiltersConfig
from data_pipeline.step import Step


def build_filters(config: FiltersConfig, seed: int) -> list[Step]:
    # Imported here so a source without language ID or classifier never loads fastText/sklearn.
    from data_pipeline.filters.c4 import C4Filter
    from data_pipeline.filters.fineweb import FineWebFilter
    from data_pipeline.filters.gopher import GopherQuality, GopherRepetition
    from data_pipeline.filters.url import UrlBlocklist

    steps: list[Step] = []
    if config.url:
        steps.append(UrlBlocklist(config.url))
    if config.language:
        from data_pipeline.filters.language import LanguageFilter
        steps.append(LanguageFilter(config.language))
    if config.gopher_repetition:
        steps.append(GopherRepetition(config.gopher_repetition))
    if config.gopher_quality:
        steps.append(GopherQuality(config.gopher_quality))
    if config.c4:
        steps.append(C4Filter(config.c4))
    if config.fineweb:
        steps.append(FineWebFilter(config.fineweb))
    if config.quality_classifier:
        from data_pipeline.filters.quality import QualityClassifierFilter
        steps.append(QualityClassifierFilter(config.quality_classifier, seed))
    return steps
