"""What every settings section shares."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class ConfigError(ValueError):
    """A configuration problem, always a single line: ``<file>: <field>: <what is wrong>``."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)
