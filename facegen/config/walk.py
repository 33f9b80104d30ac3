"""The one walk over a settings tree that digests, input-path listings and node-local copies share.

A settings tree is sections (pydantic models) holding fields, sections and lists of sections
(``clean.experts``, ``directions.classifiers``). :func:`items` says what each field of one section
is; :func:`leaves` walks a whole tree down to its plain fields with their dotted names.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel


@dataclass
class Item:
    """One field of a section: ``sections`` (a nested section as a one-item list, or a list of
    sections) or a plain ``value``; ``input_path`` is the field's input-path marker, if any."""

    name: str
    value: Any
    input_path: str | None
    sections: list[BaseModel] | None = None
    is_list: bool = False


def items(model: BaseModel, skip: frozenset[str] = frozenset()) -> Iterator[Item]:
    """The fields of ``model`` (in declaration order, then the sections a model that allows extra
    fields holds, e.g. ``generator.<backend>`` of a registered backend), those named in ``skip`` left out."""
    fields = [(name, getattr(model, name), info) for name, info in type(model).model_fields.items()]
    fields += [(name, value, None) for name, value in (model.__pydantic_extra__ or {}).items()]
    for name, value, info in fields:
        if name in skip:
            continue
        extra = info.json_schema_extra if info is not None and isinstance(info.json_schema_extra, dict) else {}
        marker = str(extra["input_path"]) if extra.get("input_path") else None
        if isinstance(value, BaseModel):
            yield Item(name, value, marker, [value])
        elif isinstance(value, list) and value and all(isinstance(v, BaseModel) for v in value):
            yield Item(name, value, marker, list(value), is_list=True)
        else:
            yield Item(name, value, marker)


@dataclass
class Leaf:
    """A plain field somewhere in a tree: the section that holds it, its name there and its dotted name."""

    owner: BaseModel
    name: str
    dotted: str
    value: Any
    input_path: str | None


def leaves(model: BaseModel, prefix: str = "") -> Iterator[Leaf]:
    """Every plain field of the tree under ``model``, depth first; list items are named ``field[i]``."""
    for item in items(model):
        dotted = f"{prefix}{item.name}"
        if item.sections is None:
            yield Leaf(model, item.name, dotted, item.value, item.input_path)
        elif item.is_list:
            for i, section in enumerate(item.sections):
                yield from leaves(section, f"{dotted}[{i}].")
        else:
            yield from leaves(item.value, f"{dotted}.")
