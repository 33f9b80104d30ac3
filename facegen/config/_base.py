"""What every settings section shares."""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict

#: The IResNets facegen builds (``facegen.models.iresnet.ARCH_DEPTHS``): insightface's, and ``_se``,
#: the DataCV organisers' squeeze-excitation variant with their parameter names.
IResNetArch = Literal["iresnet18", "iresnet34", "iresnet50", "iresnet100",
                      "iresnet18_se", "iresnet34_se", "iresnet50_se", "iresnet100_se"]


def check_device(value: str) -> str:
    """``value`` if it names a torch device facegen runs on: auto (cuda when present, else cpu),
    cpu, cuda, cuda:N or mps; ValueError otherwise (before any model is loaded)."""
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", value):
        raise ValueError(f"{value!r}: expected auto, cpu, cuda, cuda:N or mps")
    return value


#: Where torch runs a model: one spelling for every ``device`` setting (:func:`facegen.devices.resolve_device`).
Device = Annotated[str, AfterValidator(check_device)]


class ConfigError(ValueError):
    """A configuration problem, always a single line: ``<file>: <field>: <what is wrong>``."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)
