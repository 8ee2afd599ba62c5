"""docs/recipes.md is what the schema writes: a field added, renamed or redescribed in toolchain/recipe.py without
regenerating the page fails here."""

import typing

from pydantic import BaseModel

from tests.conftest import ROOT
from toolchain.recipe import Recipe
from toolchain.render.recipe_page import _sections, _type, markdown


def test_committed_recipe_reference_is_what_the_schema_writes():
    committed = (ROOT / "docs" / "recipes.md").read_text(encoding="utf-8")
    assert committed == markdown(), "docs/recipes.md is stale: run `distillery schema --markdown > docs/recipes.md`"


def test_every_field_of_every_section_has_a_row():
    page = markdown()
    sections = _sections(Recipe, "")
    assert {p for p, _ in sections} >= {"", "student", "data", "data.columns", "distill.soft", "tasks.<name>", "export"}
    for path, model in sections:
        block = page.split(f"## `{path}`\n" if path else "## Top level\n")[1].split("\n## ")[0]
        for name, field in model.model_fields.items():
            if not field.exclude:
                assert f"| `{field.alias or name}` |" in block, (path, name)


def test_types_read_as_a_user_writes_them():
    assert _type(typing.Literal["a", "b"]) == '"a" \\| "b"'
    assert _type(int | None) == "int or null"
    assert _type(list[str]) == "list of str"
    assert _type(dict[str, int]) == "map of str to int"
    assert _type(Recipe) == "section" and issubclass(Recipe, BaseModel)


def test_schema_command_prints_the_page_and_a_json_schema():
    import json

    from tests.conftest import distillery

    assert distillery("schema").stdout == markdown()
    schema = json.loads(distillery("schema", "--json").stdout)
    assert {"teacher", "data", "export", "tasks"} <= set(schema["properties"]) and "name" in schema["required"]
    assert schema["$defs"]["StudentConfig"]["properties"]["from"]["default"] == "teacher"  # aliases, as written
