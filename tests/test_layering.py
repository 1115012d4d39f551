"""The layers stay layers: who may import Ray, what the sources may import, and a codec without I/O.

Read from the source files (every import, also those inside functions), so a change that
crosses a layer fails here, before it becomes a habit:

- only the orchestration modules (`on_ray`, the one package that turns the core into Ray
  tasks, and `job`, which starts and stops Ray) import `ray`;
- the sources layer (`mnist37.sources.*`) imports nothing that orchestrates it: not the
  planner, the shards, the Ray module, the stages, the job, the converter or the GPU check;
- the codecs (`mnist37.png`, `mnist37.images`) do no I/O: they import no filesystem, store or
  source module and open no file; the sources read bytes, the codecs only decode them;
- every format in the sources table has a module with the protocol the table promises.
"""

from __future__ import annotations

import ast
import importlib
import inspect
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "mnist37"
ORCHESTRATION = {"mnist37.on_ray", "mnist37.job"}
ABOVE_SOURCES = {"mnist37.plan", "mnist37.shards", "mnist37.on_ray", "mnist37.steps", "mnist37.evaluation", "mnist37.job",
                 "mnist37.convert", "mnist37.report", "mnist37.classify"}
CODEC_MAY_NOT = {"os", "pathlib", "shutil", "tempfile", "mmap", "glob", "pyarrow", "mnist37.storage",
                 "mnist37.sources"}


def modules() -> dict[str, Path]:
    return {".".join(("mnist37", *p.relative_to(PACKAGE).with_suffix("").parts)).removesuffix(".__init__"): p
            for p in sorted(PACKAGE.rglob("*.py"))}


def imports(path: Path) -> set[str]:
    """Every module `path` imports, at the top or inside a function; `from a import b` counts
    as a and a.b (b may be a module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def under(name: str, packages: set[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


def test_the_walk_sees_every_module_and_its_lazy_imports():
    found = modules()
    assert {"mnist37.png", "mnist37.sources", "mnist37.sources.folder", "mnist37.on_ray.tasks"} <= set(found)
    # job imports the Ray module inside _run(), not at the top
    assert "mnist37.on_ray.session.disconnect" in imports(found["mnist37.job"])


def test_only_the_orchestration_modules_import_ray():
    users = {name for name, path in modules().items() if under_any(imports(path), {"ray"})}
    outside = {name for name in users if not under(name, ORCHESTRATION)}
    assert not outside, f"imports ray outside orchestration: {sorted(outside)}"


def test_the_sources_import_nothing_that_orchestrates_them():
    for name, path in modules().items():
        if under(name, {"mnist37.sources"}):
            crossing = {m for m in imports(path) if under(m, ABOVE_SOURCES)}
            assert not crossing, f"{name} imports {sorted(crossing)}"


@pytest.mark.parametrize("codec", ["mnist37.png", "mnist37.images"])
def test_the_codecs_do_no_io(codec):
    path = modules()[codec]
    crossing = {m for m in imports(path) if under(m, CODEC_MAY_NOT)}
    assert not crossing, f"{codec} imports {sorted(crossing)}"
    calls = [node for node in ast.walk(ast.parse(path.read_text()))
             if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "open"]
    assert not calls, f"{codec} calls open() at line {calls[0].lineno}"


def under_any(names: set[str], packages: set[str]) -> bool:
    return any(under(n, packages) for n in names)


def _parameters(function) -> list[str]:
    return list(inspect.signature(function).parameters)


@pytest.mark.parametrize("name", ["folder", "parquet", "webdataset", "idx"])
def test_every_format_in_the_table_implements_the_one_protocol(name):
    """The folder as much as the container formats: `check` and `plan` with the protocol's
    parameters (protocol.Source); a detected format its `containers`; a convertible one a
    writer module with protocol.Sink's members."""
    from mnist37 import sources
    from mnist37.sources import protocol

    module = sources.format_module(name)
    assert module.NAME == name
    for member in ("check", "plan"):
        assert _parameters(getattr(module, member)) == _parameters(getattr(protocol.Source, member)), (module, member)
    if name in sources.DETECTED:
        for function in ("containers", "read_shard", "converter_records"):
            assert callable(getattr(module, function)), f"{module.__name__} has no {function}()"
    if sources.FORMATS[name].convertible:
        writer = sources.writer_module(name)
        for member in ("check_classes", "output_name", "finish"):
            assert _parameters(getattr(writer, member)) == _parameters(getattr(protocol.Sink, member)), (writer, member)
        assert callable(writer.ShardWriter.add) and callable(writer.ShardWriter.close)
        assert writer.__name__ != module.__name__  # writers live apart from readers
    assert set(sources.FORMATS) >= set(sources.DETECTED) | {sources.FALLBACK}
    assert set(sources.TARGETS) <= set(sources.FORMATS)


def names_a_format(path: Path, formats: set[str]) -> list[str]:
    """Where `path` names a format of the table in a string (`fmt != "folder"`, `{"idx": ...}`)."""
    return [f"{path.name}:{node.lineno}: {node.value!r}" for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.Constant) and node.value in formats]


def test_only_the_sources_tell_formats_apart():
    """Outside mnist37/sources/, no module names a format of the table or compares format
    names: a format (the folder too) is reached through the table and its protocol alone."""
    from mnist37 import sources

    formats = set(sources.FORMATS)
    found = [hit for name, path in modules().items() if not under(name, {"mnist37.sources"})
             for hit in names_a_format(path, formats)]
    assert not found, "\n".join(found)
    # What the walk looks for, it finds: the table names every format.
    assert len(names_a_format(modules()["mnist37.sources"], formats)) >= len(formats)


def test_the_config_format_choices_are_the_table():
    from mnist37 import config, sources

    assert tuple(config.FORMATS) == ("auto", *sources.FORMATS)
    importlib.import_module("mnist37.sources")  # cheap: the format modules load when used
