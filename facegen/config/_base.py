"""What every settings section shares."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

#: The IResNets facegen builds (``facegen.models.iresnet.ARCH_DEPTHS``): insightface's, and ``_se``,
#: the DataCV organisers' squeeze-excitation variant with their parameter names.
IResNetArch = Literal["iresnet18", "iresnet34", "iresnet50", "iresnet100",
                      "iresnet18_se", "iresnet34_se", "iresnet50_se", "iresnet100_se"]


class ConfigError(ValueError):
    """A configuration problem, always a single line: ``<file>: <field>: <what is wrong>``."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)
