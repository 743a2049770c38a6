"""Canonical model paths: strict normalization, mount lookup by segments, translation."""

from __future__ import annotations

import posixpath

import pytest
from hypothesis import given
from hypothesis import strategies as st

from models_registry.paths import (
    MAX_PATH_LENGTH,
    Mount,
    PathError,
    is_within,
    mount_for,
    normalize,
    resolve,
    translate,
)

# The field report's set-up: users write /ceph/models, the workers read /fsx/models.
CEPH = Mount(
    "ceph",
    canonical="/ceph/models",
    local="/fsx/models",
    host="/mnt/ceph/models",
    container="/models",
)
SCRATCH = Mount(
    "scratch", canonical="/scratch", local="/scratch", host="/scratch", container="/scratch-models"
)


def test_seed_setup_translates_to_each_context() -> None:
    where = resolve("/ceph/models/Llama-3.3-70B-Instruct", [CEPH, SCRATCH])
    assert where.canonical == "/ceph/models/Llama-3.3-70B-Instruct"
    assert where.local == "/fsx/models/Llama-3.3-70B-Instruct"
    assert where.host == "/mnt/ceph/models/Llama-3.3-70B-Instruct"
    assert where.container == "/models/Llama-3.3-70B-Instruct"
    assert (where.mount, where.relative) == ("ceph", "Llama-3.3-70B-Instruct")


def test_one_trailing_slash_is_dropped() -> None:
    assert normalize("/ceph/models/team-a/llama/") == "/ceph/models/team-a/llama"


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        ("/ceph/models/team-a/../../etc", "'..' segments"),
        ("/ceph/models/./x", "'.' segments"),
        ("relative/path", "must be absolute"),
        ("~/x", "must be absolute"),
        ("", "is empty"),
        ("/", "filesystem root"),
        ("/ceph//models", "empty segment"),
        ("/ceph/models/x\0y", "control characters"),
        ("/ceph/models/x\ny", "control characters"),
        ("/ceph/models/x\ry", "control characters"),
        ("/ceph/models/x\ty", "control characters"),
        ("/ceph/models/x\u200by", "control characters"),  # zero-width space (format char)
        ("/ceph\uff0fmodels", "Unicode normalization"),  # fullwidth solidus
        ("/ceph/models/\uff21", "Unicode normalization"),  # fullwidth A
        ("/ceph/models/\u0430dmin", "plain ASCII"),  # Cyrillic a, NFKC-stable look-alike
        ("/ceph/models/..%2f..%2fetc", "may only use"),
        ("/ceph/models/%252e%252e", "may only use"),
        ("/ceph/models/-rf", "may not start with"),
        ("/ceph/models/.hidden", "may not start with"),
        ("/ceph/models/a b", "may only use"),
        (" /ceph/models/x", "spaces"),
        ("/" + "a" * 200, "longer than 128"),
        ("/x" * 3000, f"longer than {MAX_PATH_LENGTH}"),
        (b"/ceph/models", "must be text"),
        (None, "must be text"),
    ],
)
def test_hostile_paths_are_refused_naming_the_field(raw: object, fragment: str) -> None:
    with pytest.raises(PathError, match=r"^path ") as error:
        normalize(raw, field="path")
    assert fragment in str(error.value)
    assert error.value.field == "path"


def test_prefix_trick_is_not_inside_the_mount() -> None:
    """'/ceph/models-evil'.startswith('/ceph/models') is True; segments say otherwise."""
    assert not is_within("/ceph/models-evil/x", "/ceph/models")
    with pytest.raises(PathError, match="not inside a registered storage mount") as error:
        resolve("/ceph/models-evil/x", [CEPH])
    assert error.value.code == "path-outside-storage"


def test_nested_mounts_pick_the_longest_prefix() -> None:
    inner = Mount("inner", "/ceph/models/big", "/big", "/big", "/big-models")
    assert mount_for("/ceph/models/big/llama", [CEPH, inner]).name == "inner"
    assert mount_for("/ceph/models/small/llama", [CEPH, inner]).name == "ceph"


def test_the_mount_root_itself_translates() -> None:
    assert translate("/ceph/models", CEPH).local == "/fsx/models"


_segment = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,20}", fullmatch=True).filter(
    lambda s: s not in {".", ".."}
)


@given(st.lists(_segment, min_size=1, max_size=8))
def test_valid_paths_normalize_to_themselves_and_translate_reversibly(segments: list[str]) -> None:
    path = "/ceph/models/" + "/".join(segments)
    assert normalize(path) == path
    assert normalize(path + "/") == path
    where = translate(path, CEPH)
    assert posixpath.relpath(where.local, CEPH.local) == posixpath.relpath(path, CEPH.canonical)
    assert is_within(where.container, CEPH.container)


@given(st.text(max_size=80))
def test_anything_accepted_is_canonical_and_stays_inside_the_mount(raw: str) -> None:
    try:
        path = normalize("/ceph/models/" + raw)
    except PathError:
        return
    assert normalize(path) == path  # idempotent
    assert "//" not in path
    assert "/../" not in path + "/"
    assert path.isascii()
    assert is_within(path, CEPH.canonical)
    assert is_within(translate(path, CEPH).local, CEPH.local)


# Plain st.text() almost never draws "..", "//" or "%2f"; this alphabet draws them all the time.
_HOSTILE_PATH = st.lists(
    st.sampled_from([*"./-_a~ \\\n\0", "..", "%2f", "%252f", "\uff0f", "\u0430", "team-b"]),
    max_size=16,
).map("".join)


@given(_HOSTILE_PATH)
def test_traversal_shaped_input_never_leaves_the_mount(raw: str) -> None:
    try:
        path = normalize("/ceph/models/team-a/" + raw)
    except PathError:
        return
    segments = path.split("/")[1:]
    assert all(segment not in ("", ".", "..") for segment in segments)
    assert not any(segment.startswith(("-", ".")) for segment in segments)
    assert "%" not in path
    assert "\\" not in path
    assert posixpath.normpath(path) == path
    assert is_within(path, "/ceph/models/team-a")
