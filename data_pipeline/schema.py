"""The base of every section of the data config (`configs/data/*.yaml`); each step's section
lives beside the step that reads it, and `data_pipeline.config` composes them."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    # A misspelt key must fail loudly, not silently leave a threshold at its default.
    model_config = ConfigDict(extra="forbid")
