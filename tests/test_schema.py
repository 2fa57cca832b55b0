"""The published JSON Schema: valid, used by the loader, and true to the shipped roles."""

from __future__ import annotations

import json

import jsonschema
import yaml

from builder.roles import BUILTIN_DEFAULTS, ROLES_DIR, SCHEMA_PATH, role_names


def schema() -> dict:
    return json.loads(SCHEMA_PATH.read_text())


def test_schema_is_a_valid_json_schema() -> None:
    jsonschema.Draft202012Validator.check_schema(schema())


def test_shipped_role_files_and_defaults_match_the_schema() -> None:
    validator = jsonschema.Draft202012Validator(schema())
    for path in ROLES_DIR.glob("*.yaml"):
        data = yaml.safe_load(path.read_text())
        assert not list(validator.iter_errors(data)), path
        assert path.read_text().startswith("# yaml-language-server: $schema=../builder/schema/role.schema.json")
    assert role_names() == ["database", "management", "web"]


def test_builtin_defaults_match_the_schema() -> None:
    assert not list(jsonschema.Draft202012Validator(schema()).iter_errors(BUILTIN_DEFAULTS))


def test_schema_describes_every_key() -> None:
    def walk(node: dict, where: str) -> None:
        for key, sub in node.get("properties", {}).items():
            assert "description" in sub or "$ref" in sub, f"{where}.{key} has no description"
            walk(sub, f"{where}.{key}")

    walk(schema(), "role")
