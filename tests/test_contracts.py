"""The wire contracts: generated code matches the protos, and the protos keep our conventions."""

from __future__ import annotations

import filecmp
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

from scripts import generate_protos

GENERATED_DIR = generate_protos.REPO_ROOT / generate_protos.PROTO_PACKAGE_DIR


def test_generated_code_matches_protos(tmp_path: Path) -> None:
    generate_protos.generate(tmp_path)
    fresh_dir = tmp_path / generate_protos.PROTO_PACKAGE_DIR
    fresh = sorted(p.name for p in fresh_dir.iterdir() if p.suffix in (".py", ".pyi"))
    committed = sorted(
        p.name
        for p in GENERATED_DIR.iterdir()
        if p.suffix in (".py", ".pyi") and p.name != "__init__.py"
    )
    assert fresh == committed, "generated file set drifted: run `make protos` and commit"
    _, mismatch, errors = filecmp.cmpfiles(fresh_dir, GENERATED_DIR, fresh, shallow=False)
    assert not mismatch and not errors, f"stale generated code {mismatch}: run `make protos`"


@pytest.fixture(scope="module")
def descriptor_set(tmp_path_factory: pytest.TempPathFactory) -> descriptor_pb2.FileDescriptorSet:
    """The protos compiled with source info, so comments can be checked."""
    out = tmp_path_factory.mktemp("descriptors") / "set.pb"
    include = [f"-I{p}" for p in generate_protos.include_paths()]
    files = [str(p.relative_to(generate_protos.PROTO_ROOT)) for p in generate_protos.proto_files()]
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            *include,
            "--include_source_info",
            f"--descriptor_set_out={out}",
            *files,
        ],
        check=True,
    )
    return descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())


def _comments(file: descriptor_pb2.FileDescriptorProto) -> dict[tuple[int, ...], str]:
    return {
        tuple(loc.path): loc.leading_comments.strip()
        for loc in file.source_code_info.location
        if loc.leading_comments.strip()
    }


def _upper_snake(name: str) -> str:
    return "".join(f"_{c}" if c.isupper() and i else c for i, c in enumerate(name)).upper()


def test_files_follow_package_layout(descriptor_set: descriptor_pb2.FileDescriptorSet) -> None:
    assert descriptor_set.file
    for file in descriptor_set.file:
        assert file.package == "privscore.v1"
        assert file.name.startswith("privscore/v1/") and file.name.islower()


def _elements(file: descriptor_pb2.FileDescriptorProto) -> Iterator[tuple[tuple[int, ...], str]]:
    """(source path, name) of every message, field, enum, value, service and rpc of a file.

    Paths follow descriptor.proto field numbers: message_type=4, field=2, enum_type=5, value=2,
    service=6, method=2.
    """
    for m, message in enumerate(file.message_type):
        yield (4, m), message.name
        for f, field in enumerate(message.field):
            yield (4, m, 2, f), f"{message.name}.{field.name}"
    for e, enum in enumerate(file.enum_type):
        yield (5, e), enum.name
        for v, value in enumerate(enum.value):
            yield (5, e, 2, v), value.name
    for s, service in enumerate(file.service):
        yield (6, s), service.name
        for r, method in enumerate(service.method):
            yield (6, s, 2, r), f"{service.name}.{method.name}"


def test_every_element_is_commented(descriptor_set: descriptor_pb2.FileDescriptorSet) -> None:
    missing = [
        f"{file.name}: {name}"
        for file in descriptor_set.file
        for path, name in _elements(file)
        if path not in _comments(file)
    ]
    assert not missing, "uncommented: " + ", ".join(missing)


def test_enums_have_prefixed_unspecified_zero(
    descriptor_set: descriptor_pb2.FileDescriptorSet,
) -> None:
    for file in descriptor_set.file:
        for enum in file.enum_type:
            prefix = _upper_snake(enum.name) + "_"
            assert enum.value[0].number == 0
            assert enum.value[0].name == prefix + "UNSPECIFIED"
            assert all(value.name.startswith(prefix) for value in enum.value), enum.name


def test_each_rpc_has_its_own_request_and_response(
    descriptor_set: descriptor_pb2.FileDescriptorSet,
) -> None:
    seen: set[str] = set()
    for file in descriptor_set.file:
        for service in file.service:
            for method in service.method:
                assert method.input_type == f".privscore.v1.{method.name}Request"
                assert method.output_type == f".privscore.v1.{method.name}Response"
                assert method.input_type not in seen and method.output_type not in seen
                seen.update((method.input_type, method.output_type))


def test_times_are_timestamps_and_money_is_minor_units(
    descriptor_set: descriptor_pb2.FileDescriptorSet,
) -> None:
    money_words = ("limit", "balance", "amount")
    message_type = descriptor_pb2.FieldDescriptorProto.TYPE_MESSAGE
    for file in descriptor_set.file:
        for message in file.message_type:
            for field in message.field:
                where = f"{message.name}.{field.name}"
                if field.name.endswith("_at"):
                    assert field.type_name == ".google.protobuf.Timestamp", where
                if message.name != "Money" and any(word in field.name for word in money_words):
                    assert field.type == message_type, f"{where}: money must be a Money message"


# -- buf: lint, format and breaking changes against the last release --------------------------

PROTOS = Path(__file__).resolve().parent.parent / "protos"
BUF_TOOLS = PROTOS / "tools"
RELEASE_IMAGE = PROTOS / "releases" / "v1-289f48e.binpb"
REQUIRE_NODE_ENV = "PRIVSCORE_REQUIRE_NODE"


@pytest.fixture(scope="module")
def buf() -> Path:
    """buf from npm (@bufbuild/buf, pinned in protos/tools/package-lock.json), installed on
    first use. Without npm the buf tests skip, saying so, unless PRIVSCORE_REQUIRE_NODE=1
    (.ci/run), where they fail."""
    binary = BUF_TOOLS / "node_modules" / ".bin" / "buf"
    if not binary.exists():
        npm = shutil.which("npm")
        if npm is None:
            if os.environ.get(REQUIRE_NODE_ENV) == "1":
                pytest.fail(f"npm is not installed and {REQUIRE_NODE_ENV}=1: buf cannot run")
            pytest.skip("npm is not installed: buf lint and buf breaking are not run")
        subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund", "--silent"],
            cwd=BUF_TOOLS,
            check=True,
            timeout=300,
        )
    return binary


def run_buf(buf: Path, *args: str, cwd: Path = PROTOS) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(buf), *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )


def test_buf_lint_and_format_pass(buf: Path) -> None:
    lint = run_buf(buf, "lint")
    assert lint.returncode == 0, lint.stdout + lint.stderr
    formatted = run_buf(buf, "format", "--diff", "--exit-code", "--path", "privscore")
    assert formatted.returncode == 0, formatted.stdout


def test_no_breaking_change_since_the_last_release(buf: Path) -> None:
    found = run_buf(buf, "breaking", "--against", str(RELEASE_IMAGE), "--path", "privscore")
    assert found.returncode == 0, found.stdout + found.stderr


def test_buf_breaking_catches_a_renumbered_field(buf: Path, tmp_path: Path) -> None:
    copy = tmp_path / "protos"
    shutil.copytree(PROTOS, copy, ignore=shutil.ignore_patterns("node_modules", "tools"))
    common = copy / "privscore" / "v1" / "common.proto"
    text = common.read_text()
    assert "string pseudonym = 2;" in text
    common.write_text(text.replace("string pseudonym = 2;", "string pseudonym = 7;"))
    found = run_buf(
        buf, "breaking", "--against", str(RELEASE_IMAGE), "--path", "privscore", cwd=copy
    )
    assert found.returncode != 0
    assert "pseudonym" in found.stdout + found.stderr


def test_protos_carry_options_for_other_languages(
    descriptor_set: descriptor_pb2.FileDescriptorSet,
) -> None:
    ours = [f for f in descriptor_set.file if f.package == "privscore.v1"]
    assert ours
    for file in ours:
        options = file.options
        assert options.go_package == "privscore.dev/gen/go/privscore/v1;privscorev1", file.name
        assert options.java_package == "dev.privscore.v1" and options.java_multiple_files
        assert options.csharp_namespace == "Privscore.V1"
