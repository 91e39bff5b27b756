"""The one table of resource kinds.

A kind bundles what one resource needs for C/R: its record layouts, how to save and load it
as a shared object (``save_object``/``load_object``) and/or as a per-task section
(``save_task``/``load_task``). Dispatch goes through this table only.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from ..image.schema import Layout
from ..image.types import ObjType


@dataclass(frozen=True)
class Kind:
    name: str
    layouts: tuple[Layout, ...] = ()
    objtype: ObjType | None = None
    model_types: tuple[type, ...] = ()
    save_object: Callable | None = None
    load_object: Callable | None = None
    task_order: int | None = None
    save_task: Callable | None = None
    load_task: Callable | None = None
    doc: str = field(default="", compare=False)


KINDS: dict[str, Kind] = {}
BY_OBJTYPE: dict[ObjType, Kind] = {}
BY_MODEL_TYPE: dict[type, Kind] = {}


def register(kind: Kind) -> Kind:
    if kind.name in KINDS:
        raise ValueError(f"kind {kind.name} registered twice")
    if (kind.save_object is None) != (kind.load_object is None):
        raise ValueError(f"kind {kind.name}: save_object and load_object come together")
    if (kind.save_task is None) != (kind.load_task is None):
        raise ValueError(f"kind {kind.name}: save_task and load_task come together")
    if kind.save_object is not None:
        if kind.objtype is None or not kind.model_types:
            raise ValueError(f"kind {kind.name}: an object kind needs objtype and model_types")
        if kind.objtype in BY_OBJTYPE:
            raise ValueError(f"objtype {kind.objtype.name} owned by {BY_OBJTYPE[kind.objtype].name} and {kind.name}")
        BY_OBJTYPE[kind.objtype] = kind
        for t in kind.model_types:
            BY_MODEL_TYPE[t] = kind
    if kind.save_task is not None and kind.task_order is None:
        raise ValueError(f"kind {kind.name}: a per-task kind needs task_order")
    KINDS[kind.name] = kind
    return kind


def kind_for_object(obj) -> Kind:
    for t in type(obj).__mro__:
        kind = BY_MODEL_TYPE.get(t)
        if kind is not None:
            return kind
    raise LookupError(f"no resource kind saves {type(obj).__name__} objects")


def task_kinds() -> list[Kind]:
    return sorted((k for k in KINDS.values() if k.save_task), key=lambda k: (k.task_order, k.name))


def also_saves(kind_name: str, *types: type) -> None:
    """Let an existing kind save objects of other Python types that have the same attributes
    (the live backend's stand-ins for model objects): one save function serves both."""
    kind = KINDS[kind_name]
    if kind.save_object is None:
        raise ValueError(f"kind {kind_name} saves no objects")
    for t in types:
        if t in BY_MODEL_TYPE and BY_MODEL_TYPE[t] is not kind:
            raise ValueError(f"{t.__name__} is already saved by {BY_MODEL_TYPE[t].name}")
        BY_MODEL_TYPE[t] = kind
