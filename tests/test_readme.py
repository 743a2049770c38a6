"""The README stays true: every environment variable Berth reads is in its configuration table,
and the screenshots it shows exist."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from deployments.runtime.engine_args import PARSERS
from deployments.web.api import FIELDS
from tests.conftest import BASE_DIR

README = BASE_DIR / "README.md"
# Where settings are read: the project's own code (not its tests, benchmarks or migrations;
# config/env.py holds the readers themselves).
SKIPPED = {".venv", "tests", "benchmarks", "var", "artifacts", "docs", "migrations"}
READERS = re.compile(r"^env_[a-z]+$|^getenv$")


def _project_files() -> list[Path]:
    return [
        path
        for path in BASE_DIR.rglob("*.py")
        if not SKIPPED & set(path.relative_to(BASE_DIR).parts)
        and path != BASE_DIR / "config" / "env.py"
    ]


def environment_variables_read() -> dict[str, str]:
    """Name -> the file reading it: ``env_*("NAME", ...)``, ``os.getenv("NAME")``,
    ``os.environ.get("NAME")`` and ``os.environ["NAME"]`` with a literal name."""
    found: dict[str, str] = {}
    for path in _project_files():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            name = _read_name(node)
            if name is not None:
                found.setdefault(name, str(path.relative_to(BASE_DIR)))
    return found


def _read_name(node: ast.AST) -> str | None:
    if isinstance(node, ast.Subscript) and _is_environ(node.value):
        key = node.slice
    elif isinstance(node, ast.Call) and node.args:
        function = node.func
        called = getattr(function, "id", None) or getattr(function, "attr", "")
        is_reader = READERS.match(called) or (
            called == "get" and _is_environ(getattr(function, "value", None))
        )
        if not is_reader:
            return None
        key = node.args[0]
    else:
        return None
    if isinstance(key, ast.Constant) and isinstance(key.value, str):
        return key.value
    return None


def _is_environ(node: ast.AST | None) -> bool:
    return isinstance(node, ast.Attribute) and node.attr == "environ"


def configuration_table() -> str:
    text = README.read_text(encoding="utf-8")
    start = text.index("\n## Configuration\n")
    return text[start : text.index("\n## ", start + 1)]


def test_every_environment_variable_is_in_the_configuration_table() -> None:
    read = environment_variables_read()
    assert "DATABASE_URL" in read  # the scan works
    documented = set(re.findall(r"`([A-Z][A-Z0-9_]+)`", configuration_table()))
    missing = {name: where for name, where in read.items() if name not in documented}
    assert missing == {}, f"add these to the README's configuration table: {missing}"


def test_the_readme_screenshots_exist() -> None:
    images = re.findall(r"\]\((docs/screenshots/[^)]+\.png)\)", README.read_text(encoding="utf-8"))
    assert images, "the README shows no screenshot"
    for image in images:
        assert (BASE_DIR / image).stat().st_size > 10_000, image


def test_the_json_api_fields_are_documented_exactly() -> None:
    """Every field the JSON deploy API accepts is in the README's table, described as the API
    describes it in its own refusals (``model`` an id, the others names; ``override_reason``)."""
    rows = dict(re.findall(r"^  \| `([a-z_]+)` \| (.+?) \|$", README.read_text(), re.M))
    assert set(rows) == set(FIELDS)
    for field, description in FIELDS.items():
        if field != "engine_args":
            assert rows[field] == description, field
    assert rows["engine_args"].startswith(FIELDS["engine_args"])
    assert re.findall(r"`([a-z_]+)`", rows["engine_args"]) == list(PARSERS)
