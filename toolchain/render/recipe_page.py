"""The recipe reference (docs/recipes.md), written from the schema in toolchain/recipe.py: every field with its
type, default and description, one table per section. ``distillery schema --markdown`` prints it; a test fails
when the committed page differs, so the reference cannot drift from the code."""

from __future__ import annotations

import json
import types
import typing

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from toolchain.recipe import Recipe

HEADER = """# Recipe reference

Every field a recipe may set, with its type, default and meaning. Written by `distillery schema --markdown`
from the schema in `toolchain/recipe.py` (a test checks that this page is what the schema writes, so edit the
schema's descriptions, not this page). `distillery validate RECIPE` checks a recipe against it; an unknown key
is an error naming the field.
"""


def _type(annotation) -> str:
    """A type as a reader writes it: ``int``, ``list of str``, ``a | b``, ``... or null``."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return " \\| ".join(json.dumps(a) if isinstance(a, str) else str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        kinds = [a for a in args if a is not type(None)]
        text = " or ".join(_type(a) for a in kinds)
        return f"{text} or null" if len(kinds) < len(args) else text
    if origin is list:
        return f"list of {_type(args[0])}"
    if origin is dict:
        return f"map of {_type(args[0])} to {_type(args[1])}"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "section"
    return getattr(annotation, "__name__", str(annotation))


def _default(field) -> str:
    if field.is_required():
        return "required"
    if field.default_factory is not None:
        value = field.default_factory()
        if isinstance(value, BaseModel):
            return "(section)"
    else:
        value = field.default
    if value is PydanticUndefined:
        return "required"
    return f"`{json.dumps(value)}`"


def _sections(model: type[BaseModel], path: str) -> list[tuple[str, type[BaseModel]]]:
    """(dotted path, model) for ``model`` and every section under it, depth first."""
    out = [(path, model)]
    for name, field in model.model_fields.items():
        if field.exclude:
            continue
        key = f"{path}.{field.alias or name}" if path else field.alias or name
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out += _sections(ann, key)
        elif typing.get_origin(ann) is dict and isinstance(typing.get_args(ann)[1], type) \
                and issubclass(typing.get_args(ann)[1], BaseModel):
            out += _sections(typing.get_args(ann)[1], f"{key}.<name>")
        else:
            for arg in typing.get_args(ann):  # an optional section (reasoning-style `X | None`)
                if isinstance(arg, type) and issubclass(arg, BaseModel):
                    out += _sections(arg, key)
    return out


def markdown() -> str:
    lines = [HEADER]
    for path, model in _sections(Recipe, ""):
        lines += ["", f"## `{path}`" if path else "## Top level", ""]
        doc = (model.__doc__ or "").strip()
        if doc and model is not Recipe and not doc.startswith(("Usage docs", "!!!")):
            lines += [" ".join(doc.split()), ""]
        lines += ["| field | type | default | description |", "|---|---|---|---|"]
        for name, field in model.model_fields.items():
            if field.exclude:
                continue
            desc = " ".join((field.description or "").split()).replace("|", "\\|")
            if not desc and _type(field.annotation) == "section":
                desc = f"The `{path + '.' if path else ''}{field.alias or name}` section below."
            lines.append(f"| `{field.alias or name}` | {_type(field.annotation)} | {_default(field)} | {desc} |")
    return "\n".join(lines) + "\n"
