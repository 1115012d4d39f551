"""docs/architecture.md stays true to the code: every module, class, function and file it names
in backquotes exists, where it says, with the parameters it gives.

Read from the source files (ast, nothing imported), what counts as a name in a backquoted span:

- a path: `mnist37/...py`, `tests/...`, `benchmarks/...`, `jobs/...`, `configs/...`, `docs/...`,
  `sources/...` (under mnist37/), and a bare `x.py` beside an earlier path in the same line
  (`mnist37/sources/parquet.py`, `webdataset.py`): the file or folder exists; a placeholder
  (`mnist37/sources/<name>.py`) must match at least one file, as a pattern nothing follows is
  as wrong as a missing file;
- a dotted name whose first part is the package or one of its modules (`mnist37.job`,
  `base.decode_records`, `chunks._class_sums`): the module, then each attribute defined there
  (a function, class or assignment of that module, or a member of that class; a name the module
  only imports does not count: the doc says where a thing lives);
- a call, `name(...)`: defined in the context (below), and when its arguments are plain names,
  they are the function's parameters in order (self left out; trailing parameters with
  defaults may be left out);
- a bare name in a row of a module table (`| mnist37/shards.py | ... `decode_shard` ...`): defined
  in that row's modules, or a config key (a field of `mnist37.config.Config`); elsewhere a bare
  CamelCase name is defined somewhere in the package (and an UPPER_CASE one too in "Adding a
  format"; in prose it may be an environment variable), and a bare lowercase one is not checked
  (config keys, values such as `auto` and fixtures such as `tmp_path` read the same);
- in "Adding a format", calls resolve in the format modules the table names (`mnist37.sources.FORMATS`:
  readers and writers), `mnist37.sources.protocol` and `mnist37.sources.base`, what that section describes:
  `f()` names a function, and `f(a, b)` gives its parameters.

Relative links (`[figures](figures.md#...)`) must point at files that exist, too.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "mnist37"
DOC = ROOT / "docs" / "architecture.md"
TOP_FOLDERS = ("mnist37/", "tests/", "benchmarks/", "jobs/", "configs/", "docs/")
# Dotted spans that name data, not code: the footer key a chunk's checksum is stored under.
DATA_KEYS = {"mnist37.checksum": PACKAGE / "chunks.py"}
FILE_SUFFIXES = {"json", "html", "txt", "toml", "yaml", "py", "arrow", "png", "tgz", "tar", "md", "log"}
IDENTIFIER = re.compile(r"[A-Za-z_]\w*")
DOTTED = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+")
CALL = re.compile(r"([A-Za-z_][\w.]*)\((.*)\)", re.DOTALL)


@dataclass
class Scope:
    """What a module or class defines: names, their parameters if callable, class members."""

    params: dict[str, list[ast.arg] | None] = field(default_factory=dict)
    defaults: dict[str, int] = field(default_factory=dict)
    members: dict[str, Scope] = field(default_factory=dict)


def _function(scope: Scope, node: ast.FunctionDef | ast.AsyncFunctionDef, method: bool) -> None:
    args = [*node.args.posonlyargs, *node.args.args, *node.args.kwonlyargs]
    if method and args and args[0].arg in ("self", "cls") and not any(
            isinstance(d, ast.Name) and d.id == "staticmethod" for d in node.decorator_list):
        args = args[1:]
    scope.params[node.name] = args
    scope.defaults[node.name] = len(node.args.defaults) + sum(d is not None for d in node.args.kw_defaults)


def _collect(body: list[ast.stmt], scope: Scope, method: bool = False) -> None:
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            _function(scope, node, method)
        elif isinstance(node, ast.ClassDef):
            inner = Scope()
            _collect(node.body, inner, method=True)
            scope.members[node.name] = inner
            # Calling the class: its __init__'s parameters, or (a dataclass) its fields'.
            if "__init__" in inner.params:
                scope.params[node.name] = inner.params["__init__"]
                scope.defaults[node.name] = inner.defaults["__init__"]
            else:
                scope.params[node.name] = None
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                for name in ast.walk(target):
                    if isinstance(name, ast.Name):
                        scope.params.setdefault(name.id, None)
        elif isinstance(node, (ast.If, ast.Try, ast.With)):
            _collect([n for part in ("body", "orelse", "finalbody") for n in getattr(node, part, [])], scope, method)


def modules() -> dict[str, Scope]:
    """Every module of the package by its dotted name, with what it defines."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = ".".join(("mnist37", *path.relative_to(PACKAGE).with_suffix("").parts)).removesuffix(".__init__")
        scope = Scope()
        _collect(ast.parse(path.read_text(), filename=str(path)).body, scope)
        found[name] = scope
    return found


MODULES = modules()
CONFIG_KEYS = set(MODULES["mnist37.config"].members["Config"].params)


def defines(scope: Scope, name: str) -> Scope | None:
    """The scope that defines `name`: `scope` itself, or one of its classes (a method, a field)."""
    if name in scope.params:
        return scope
    return next((inner for inner in scope.members.values() if name in inner.params), None)


def module_named(first: str) -> list[str]:
    """The package's modules a dotted name's first part may mean: `mnist37`, or a module's last part."""
    if first == "mnist37":
        return ["mnist37"]
    return [m for m in MODULES if m.rsplit(".", 1)[-1] == first]


def resolve_dotted(dotted: str) -> str | None:
    """None when `dotted` names what exists, else what is wrong; '' when it is not the package's."""
    parts = dotted.split(".")
    candidates = module_named(parts[0])
    if not candidates:
        return ""  # ray.init, os.open, pa.array: not ours
    for module in candidates:
        rest = parts[1:]
        while rest and f"{module}.{rest[0]}" in MODULES:  # mnist37.sources.folder
            module, rest = f"{module}.{rest[0]}", rest[1:]
        scope = MODULES[module]
        for part in rest:
            scope = scope.members.get(part) if part in scope.members else (scope if part in scope.params else None)
            if scope is None:
                break
        if scope is not None:
            return None
    return f"{dotted}: no such name in {' or '.join(candidates)}"


@dataclass
class Span:
    text: str
    line: int
    section: str
    row_modules: list[str]
    line_paths: list[str]


def spans() -> list[Span]:
    """Every backquoted span of the doc outside code blocks, with where it stands."""
    lines = DOC.read_text().splitlines()
    fenced, kept = False, []
    for line in lines:
        if line.startswith("```"):
            fenced = not fenced
            kept.append("")
        else:
            kept.append("" if fenced else line)
    text = "\n".join(kept)
    starts = [0]
    for line in kept:
        starts.append(starts[-1] + len(line) + 1)
    found = []
    for match in re.finditer(r"`([^`]+)`", text):
        number = max(i for i, s in enumerate(starts) if s <= match.start())
        line = kept[number]
        section = next((kept[i][3:] for i in range(number, -1, -1) if kept[i].startswith("## ")), "")
        paths = [p for p in re.findall(r"`([^`\s]+)`", line) if p.startswith(TOP_FOLDERS) or "/" in p]
        row = []
        if line.startswith("| "):
            first_cell = line.split("|")[1]
            row = [m for p in expand_paths(re.findall(r"`([^`]+)`", first_cell)) if (m := module_of(p)) in MODULES]
        found.append(Span(" ".join(match.group(1).split()), number + 1, section, row, paths))
    return found


def expand_paths(items: list[str]) -> list[str]:
    """`mnist37/sources/parquet.py`, `webdataset.py`: each bare file beside the path before it."""
    out, folder = [], ""
    for item in items:
        if "/" in item:
            folder = item.rsplit("/", 1)[0] + "/"
            out.append(item)
        elif item.endswith(".py") and folder:
            out.append(folder + item)
    return out


def module_of(path: str) -> str | None:
    if path.startswith("mnist37/") and path.endswith(".py"):
        return ".".join(Path(path).with_suffix("").parts).removesuffix(".__init__")
    return None


def check_path(path: str) -> str | None:
    where = ROOT / ("mnist37/" + path if path.startswith("sources/") else path)
    if "<" in path:
        pattern = re.sub(r"<[^>]+>", "*", str(where.relative_to(ROOT))).rstrip("/")
        if not list(ROOT.glob(pattern)):
            return f"{path}: no file follows this pattern"
        return None
    return None if where.exists() else f"{path}: no such file or folder"


def format_modules() -> list[str]:
    """The reader and writer modules the sources table names, the protocol and base (what
    'Adding a format' describes)."""
    text = (PACKAGE / "sources" / "__init__.py").read_text()
    names = set(re.findall(r'"(mnist37\.sources\.\w+)"', text)) | {"mnist37.sources.base", "mnist37.sources.protocol"}
    return sorted(n for n in names if n in MODULES)


def check_call(name: str, args: str, context: list[str]) -> str | None:
    if "." in name:
        problem = resolve_dotted(name)
        if problem or problem == "":
            return problem or None
        first, *rest = name.split(".")
        module = module_named(first)[0]
        while rest[:-1] and f"{module}.{rest[0]}" in MODULES:
            module, rest = f"{module}.{rest[0]}", rest[1:]
        scopes, name = [MODULES[module]], rest[-1]
    else:
        scopes = [MODULES[m] for m in context] if context else list(MODULES.values())
    owners = [s for s in (defines(scope, name) for scope in scopes) if s is not None]
    if not owners:
        return f"{name}(...): defined in none of {', '.join(context) or 'the package'}"
    given = [a.strip() for a in args.split(",")] if args.strip() else []
    if not given or not all(IDENTIFIER.fullmatch(a) for a in given):
        return None  # `detect()` names a function; `classify_split(..., "cpu")` is an example
    signatures = []
    for owner in owners:
        params = owner.params[name]
        if params is None:
            return None  # a class without __init__ (a dataclass): its fields are not checked here
        names = [p.arg for p in params]
        required = len(names) - owner.defaults[name]
        if given == names[:len(given)] and len(given) >= required:
            return None
        signatures.append(f"({', '.join(names)})")
    return f"{name}({', '.join(given)}): its parameters are {' or '.join(dict.fromkeys(signatures))}"


def problems() -> list[str]:
    found = []
    formats = format_modules()
    for span in spans():
        text = span.text
        problem = None
        if text.startswith(("-", "<", ".")) or any(c in text for c in " =\"'*") and not CALL.fullmatch(text):
            continue  # flags, placeholders of the cache layout, expressions
        if call := CALL.fullmatch(text):
            context = formats if span.section == "Adding a format" else span.row_modules
            problem = check_call(call.group(1), call.group(2), context)
        elif text.startswith(TOP_FOLDERS + ("sources/",)):
            problem = check_path(text)
        elif text.endswith(".py") and "/" not in text:
            near = [p for p in expand_paths(span.line_paths + [text]) if p.endswith("/" + text)]
            problem = check_path(near[-1]) if near else f"{text}: a file named without the folder it is in"
        elif text in DATA_KEYS:
            problem = None if f'"{text}"' in DATA_KEYS[text].read_text() or f"b\"{text}\"" in \
                DATA_KEYS[text].read_text() else f"{text}: not a key of {DATA_KEYS[text].relative_to(ROOT)}"
        elif DOTTED.fullmatch(text) and text.rsplit(".", 1)[-1] not in FILE_SUFFIXES:
            problem = resolve_dotted(text) or None
        elif IDENTIFIER.fullmatch(text):
            if span.row_modules:
                scopes = span.row_modules
            elif text[0].isupper() and (not text.isupper() or span.section == "Adding a format"):
                scopes = list(MODULES)  # a class, or the table's constants; not RAY_ADDRESS in prose
            else:
                continue
            if not any(defines(MODULES[m], text) for m in scopes) and text not in CONFIG_KEYS:
                problem = f"{text}: defined in none of {', '.join(scopes) if len(scopes) < 6 else 'the package'}"
        if problem:
            found.append(f"docs/architecture.md:{span.line}: {problem}")
    for number, line in enumerate(DOC.read_text().splitlines(), 1):
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", line):
            if not target.startswith(("http://", "https://", "mailto:")) and not (DOC.parent / target).exists():
                found.append(f"docs/architecture.md:{number}: link to {target}, which does not exist")
    return found


def test_the_check_reads_what_the_doc_names():
    """The check sees the doc's names as the doc means them (so an empty list below means something)."""
    found = spans()
    texts = {s.text for s in found}
    assert {"mnist37/on_ray/session.py", "decode_shard", "prototypes.ClassSums", "FORMATS"} <= texts
    row = next(s for s in found if s.text == "decode_shard")
    assert row.row_modules == ["mnist37.shards"]
    assert next(s for s in found if s.text == "webdataset.py").line_paths[0] == "mnist37/sources/parquet.py"
    assert {"mnist37.sources.folder", "mnist37.sources.parquet", "mnist37.sources.parquet_writer",
            "mnist37.sources.base"} <= set(format_modules())
    assert "stall_timeout_s" in CONFIG_KEYS


@pytest.mark.parametrize("dotted, expected", [
    ("base.first_shape", "base.first_shape: no such name in mnist37.sources.base"),
    ("base.Decoding", "base.Decoding: no such name in mnist37.sources.base"),  # imported there, defined in images
    ("images.Decoding", None),
    ("mnist37.sources.folder.list_split", None),
    ("ray.init", ""),
])
def test_a_dotted_name_resolves_where_it_is_defined(dotted, expected):
    assert resolve_dotted(dotted) == expected


def test_a_call_is_held_to_its_parameters():
    parquet = ["mnist37.sources.parquet"]
    assert check_call("containers", "root, listed", parquet) is None
    assert check_call("plan", "root, splits, train_split", parquet) == (
        "plan(root, splits, train_split): its parameters are (request)")
    assert check_call("first_images", "root, shards, wanted", ["mnist37.sources.base"]) is None  # defaults left out
    assert check_call("add", "path, class_index, data", ["mnist37.sources.parquet_writer"]) is None  # ShardWriter's
    assert check_call("nothing_here", "", parquet) == "nothing_here(...): defined in none of mnist37.sources.parquet"


def test_a_placeholder_path_must_match_a_file():
    assert check_path("mnist37/sources/<name>.py") is None
    assert check_path("tests/test_nothing_<name>.py") == "tests/test_nothing_<name>.py: no file follows this pattern"
    assert check_path("sources/base.py") is None


def test_every_name_in_the_architecture_doc_exists():
    found = problems()
    assert not found, "\n".join(found)
