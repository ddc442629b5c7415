"""The NPU API contract, read statically: what the project calls on torch_npu / torch.npu / torchair (collected by
parsing the project's own source with ast) and whether the real torch_npu wheels define it with a signature that
accepts the call. The wheels cannot be imported without CANN, so their Python source is parsed instead.

Used by tests/test_npu_contract.py; runnable on its own to print the collected uses:
    python tests/npu_contract.py
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VERSIONS = ("2.5.1", "2.13.0", "2.14.0")  # the model card's stack, the one that pairs with CI's torch, the newest
# One fixed wheel per version whatever the interpreter running the tests: pure-Python source is all that is read.
WHEEL_PLATFORM = (
    "--platform",
    "manylinux_2_28_x86_64",
    "--platform",
    "manylinux2014_x86_64",
    "--python-version",
    "3.11",
    "--only-binary",
    ":all:",
)
ROOTS = ("torch_npu", "torchair")
TORCHAIR_PACKAGE = "torch_npu.dynamo.torchair"  # where the wheel ships it; torch_npu installs it as `torchair`
SKIP_DIRS = {"tests", ".venv", "venv", ".git", "build", "dist", "__pycache__", "node_modules"}


def cache_dir() -> Path:
    override = os.environ.get("MOBILEVIT_NPU_WHEELS")
    return Path(override) if override else Path.home() / ".cache" / "mobilevit-npu" / "wheels"


def required() -> bool:
    """In CI the contract must run: a wheel that cannot be fetched is a failure there, a skip elsewhere."""
    return any(os.environ.get(name, "") not in ("", "0") for name in ("CI", "MOBILEVIT_REQUIRE_NPU_WHEELS"))


class WheelUnavailable(Exception):
    pass


def fetch_wheel(version: str, folder: Path | None = None) -> Path:
    """The torch-npu wheel of `version` in the cache folder, downloaded with pip (no dependencies) when absent."""
    folder = folder or cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    found = sorted(folder.glob(f"torch_npu-{version}-*.whl"))
    if found:
        return found[-1]
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--quiet",
        "--no-deps",
        "--disable-pip-version-check",
        f"torch-npu=={version}",
        "-d",
        str(folder),
        *WHEEL_PLATFORM,
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise WheelUnavailable(f"pip download torch-npu=={version}: {exc}") from exc
    found = sorted(folder.glob(f"torch_npu-{version}-*.whl"))
    if proc.returncode != 0 or not found:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise WheelUnavailable(f"pip download torch-npu=={version} failed: {tail[0]}")
    return found[-1]


def unpack_sources(wheel: Path) -> Path:
    """The wheel's .py files (and nothing else) unpacked beside it, once."""
    dest = wheel.with_suffix("").with_name(wheel.stem + ".src")
    marker = dest / ".complete"
    if not marker.exists():
        with zipfile.ZipFile(wheel) as zf:
            for name in zf.namelist():
                if name.endswith(".py") and not name.startswith("/") and ".." not in name.split("/"):
                    zf.extract(name, dest)
        marker.write_text("ok\n")
    return dest


def library_bytes(wheel: Path) -> bytes:
    """torch_npu/lib/libtorch_npu.so of the wheel (read from the archive, not unpacked): the C++ side's string
    constants (warning texts, the environment switches it reads) are in it."""
    with zipfile.ZipFile(wheel) as zf:
        return zf.read("torch_npu/lib/libtorch_npu.so")


def registered_backends(source: Source) -> dict[str, list[str]]:
    """Process-group backends the wheel registers: torch.distributed.Backend.register_backend("<name>", ...,
    devices=[...]) calls anywhere in its Python source -> {name: devices}."""
    found: dict[str, list[str]] = {}
    for path in sorted(set(source.files.values())):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            func = getattr(node, "func", None)
            if not (isinstance(node, ast.Call) and isinstance(func, ast.Attribute) and func.attr == "register_backend"):
                continue
            if not (isinstance(func.value, ast.Attribute) and func.value.attr == "Backend"):
                continue  # rpc's backend_registry.register_backend is another registry
            if node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                devices = [k.value for k in node.keywords if k.arg == "devices"]
                names = [
                    e.value for d in devices if isinstance(d, ast.List) for e in d.elts if isinstance(e, ast.Constant)
                ]
                found.setdefault(node.args[0].value, []).extend(
                    n for n in names if n not in found.get(node.args[0].value, [])
                )
    return found


# ---------------------------------------------------------------------------------------------------------------------
# The project side: every attribute path used on the NPU roots.


@dataclass
class Use:
    """One use of the NPU API: `path` like ("torch_npu", "npu", "set_device"); a "()" element is a call result (an
    instance). `kind`: attr (read), call, set (assigned) or module (imported by name)."""

    path: tuple[str, ...]
    kind: str
    where: str
    nargs: int = 0
    keywords: tuple[str, ...] = ()
    open_args: bool = False  # *args / **kwargs in the call: only the names that are spelled out are checked
    value: object = None  # for `set` with a literal value

    def dotted(self) -> str:
        return ".".join(self.path).replace(".()", "()")


def _module_path(text: str) -> tuple[str, ...] | None:
    parts = tuple(text.split("."))
    return parts if parts[0] in ROOTS else None


class _Collector(ast.NodeVisitor):
    def __init__(self, rel: str, returns: dict[str, tuple[str, ...]]):
        self.rel = rel
        self.returns = returns  # project functions (by name) that return an NPU object, and which
        self.scopes: list[dict[str, tuple[str, ...]]] = [{}]
        self.uses: list[Use] = []

    # bindings -------------------------------------------------------------------------------------------------------
    def _lookup(self, name: str) -> tuple[str, ...] | None:
        for scope in reversed(self.scopes):
            if name in scope:
                return scope[name]
        return None

    def path_of(self, node: ast.AST) -> tuple[str, ...] | None:
        """The NPU path an expression denotes, or None."""
        if isinstance(node, ast.Name):
            if node.id in ROOTS and self._lookup(node.id) is None:
                return (node.id,)
            return self._lookup(node.id)
        if isinstance(node, ast.Attribute):
            if isinstance(node.value, ast.Name) and node.value.id == "torch" and node.attr == "npu":
                return ("torch_npu", "npu")
            base = self.path_of(node.value)
            return base + (node.attr,) if base else None
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if name == "import_module" and node.args and isinstance(node.args[0], ast.Constant):
                return _module_path(str(node.args[0].value))
            if name == "get" and isinstance(func, ast.Attribute) and _is_sys_modules(func.value):
                if node.args and isinstance(node.args[0], ast.Constant):
                    return _module_path(str(node.args[0].value))
            base = self.path_of(func)
            if base:
                return base + ("()",)
            if name in self.returns:
                return self.returns[name]
            return None
        if isinstance(node, ast.Subscript) and _is_sys_modules(node.value) and isinstance(node.slice, ast.Constant):
            return _module_path(str(node.slice.value))
        if isinstance(node, ast.BoolOp):
            for value in node.values:
                found = self.path_of(value)
                if found:
                    return found
        if isinstance(node, ast.IfExp):
            return self.path_of(node.body) or self.path_of(node.orelse)
        return None

    def _bind(self, target: ast.AST, path: tuple[str, ...] | None) -> None:
        if isinstance(target, ast.Name):
            if path:
                self.scopes[-1][target.id] = path
            else:
                self.scopes[-1].pop(target.id, None)

    def _where(self, node: ast.AST) -> str:
        return f"{self.rel}:{getattr(node, 'lineno', 0)}"

    # visitors -------------------------------------------------------------------------------------------------------
    def visit_FunctionDef(self, node):
        self.scopes.append({})
        self.generic_visit(node)
        self.scopes.pop()

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_Import(self, node):
        for alias in node.names:
            path = _module_path(alias.name)
            if path:
                self.uses.append(Use(path, "module", self._where(node)))
                self._bind(ast.Name(alias.asname or path[0]), path if alias.asname else path[:1])

    def visit_ImportFrom(self, node):
        if node.module and not node.level and _module_path(node.module):
            base = _module_path(node.module)
            for alias in node.names:
                self.uses.append(Use(base + (alias.name,), "attr", self._where(node)))
                self._bind(ast.Name(alias.asname or alias.name), base + (alias.name,))

    def visit_Assign(self, node):
        self.visit(node.value)
        path = self.path_of(node.value)
        for target in node.targets:
            if isinstance(target, ast.Attribute):
                base = self.path_of(target.value)
                if base:
                    value = node.value.value if isinstance(node.value, ast.Constant) else None
                    self.uses.append(Use(base + (target.attr,), "set", self._where(node), value=value))
                    self.visit(target.value)
                    continue
            self.visit(target)
            self._bind(target, path)

    def visit_Call(self, node):
        path = self.path_of(node.func)
        if path and isinstance(node.func, ast.Attribute):
            self.uses.append(
                Use(
                    path,
                    "call",
                    self._where(node),
                    nargs=sum(not isinstance(a, ast.Starred) for a in node.args),
                    keywords=tuple(k.arg for k in node.keywords if k.arg),
                    open_args=any(isinstance(a, ast.Starred) for a in node.args)
                    or any(k.arg is None for k in node.keywords),
                )
            )
            self.visit(node.func.value)
            for child in node.args + [k.value for k in node.keywords]:
                self.visit(child)
            return
        imported = self.path_of(node)
        if imported and isinstance(node.func, (ast.Attribute, ast.Name)) and _callee(node) == "import_module":
            self.uses.append(Use(imported, "module", self._where(node)))
        self.generic_visit(node)

    def visit_Attribute(self, node):
        path = self.path_of(node)
        if path and len(path) > 1:
            self.uses.append(Use(path, "attr", self._where(node)))
            return  # the longest chain stands for its prefixes
        self.generic_visit(node)


def _callee(node: ast.Call) -> str | None:
    func = node.func
    return func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)


def _is_sys_modules(node: ast.AST) -> bool:
    return isinstance(node, ast.Attribute) and node.attr == "modules" and getattr(node.value, "id", None) == "sys"


def project_files(root: Path = ROOT) -> list[Path]:
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("."))
        files += [Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py")]
    return files


def _function_returns(trees: dict[str, ast.Module]) -> dict[str, tuple[str, ...]]:
    """Project functions that return an NPU object (npu_api -> torch_npu.npu, ...), found to a fixed point."""
    returns: dict[str, tuple[str, ...]] = {}
    for _ in range(5):
        changed = False
        for rel, tree in trees.items():
            for fn in ast.walk(tree):
                if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)) or fn.name in returns:
                    continue
                collector = _Collector(rel, returns)
                collector.scopes.append({})
                for stmt in fn.body:  # bindings in order, then the returns' paths
                    for node in _walk_in_order(stmt):
                        if isinstance(node, ast.Assign):
                            for target in node.targets:
                                collector._bind(target, collector.path_of(node.value))
                        elif isinstance(node, (ast.Import, ast.ImportFrom)):
                            collector.visit(node)
                        elif isinstance(node, ast.Return) and node.value is not None:
                            path = collector.path_of(node.value)
                            if path and fn.name not in returns:
                                returns[fn.name] = path
                                changed = True
        if not changed:
            break
    return returns


def _walk_in_order(node: ast.AST):
    yield node
    for child in ast.iter_child_nodes(node):
        if not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
            yield from _walk_in_order(child)


def collect_uses(root: Path = ROOT) -> list[Use]:
    trees = {str(p.relative_to(root)): ast.parse(p.read_text(encoding="utf-8"), str(p)) for p in project_files(root)}
    returns = _function_returns(trees)
    uses: list[Use] = []
    for rel, tree in trees.items():
        collector = _Collector(rel, returns)
        collector.visit(tree)
        uses += collector.uses
    return uses


# ---------------------------------------------------------------------------------------------------------------------
# The wheel side: a static resolver over the unpacked sources.


@dataclass
class _Module:
    name: str
    tree: ast.Module
    is_package: bool


@dataclass
class _Instance:
    cls: ast.ClassDef
    module: _Module


@dataclass
class Resolved:
    kind: str  # module | function | class | instance | value | dynamic
    node: ast.AST | None = None
    module: _Module | None = None
    bound: bool = False  # a method reached through an instance: `self` is already given
    extra: dict = field(default_factory=dict)


class Missing(Exception):
    pass


class Source:
    """The torch_npu package of one wheel, unpacked: modules by dotted name, with torchair under its own name."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.files: dict[str, Path] = {}
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("")
            parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
            if not parts:
                continue
            name = ".".join(parts)
            self.files[name] = path
            prefix = TORCHAIR_PACKAGE + "."
            if name == TORCHAIR_PACKAGE or name.startswith(prefix):
                self.files["torchair" + name[len(TORCHAIR_PACKAGE) :]] = path
        self._modules: dict[str, _Module] = {}

    def module(self, name: str) -> _Module | None:
        if name not in self._modules:
            path = self.files.get(name)
            if path is None:
                return None
            self._modules[name] = _Module(name, ast.parse(path.read_text(encoding="utf-8")), path.name == "__init__.py")
        return self._modules[name]

    # name lookup ----------------------------------------------------------------------------------------------------
    def _absolute(self, module: _Module, level: int, target: str | None) -> str:
        if not level:
            return target or ""
        base = module.name.split(".")
        base = base if module.is_package else base[:-1]
        base = base[: len(base) - (level - 1)]
        return ".".join(base + ([target] if target else []))

    def lookup(self, module: _Module, name: str, depth: int = 0) -> Resolved:
        """`module.name`: a top-level definition, an import binding, a star import, or a submodule."""
        if depth > 40:
            raise Missing(f"{module.name}.{name}: import cycle")
        found = None
        stars = []
        for stmt in _top_level(module.tree):
            if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)) and stmt.name == name:
                found = Resolved("function", stmt, module)
            elif isinstance(stmt, ast.ClassDef) and stmt.name == name:
                found = Resolved("class", stmt, module)
            elif isinstance(stmt, (ast.Assign, ast.AnnAssign)):
                targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
                if any(isinstance(t, ast.Name) and t.id == name for t in targets) and stmt.value is not None:
                    found = ("expr", stmt.value)
            elif isinstance(stmt, ast.Import):
                for alias in stmt.names:
                    if alias.asname == name:
                        found = ("module", alias.name)
                    elif not alias.asname and alias.name.split(".")[0] == name:
                        found = ("module", name)
            elif isinstance(stmt, ast.ImportFrom):
                source = self._absolute(module, stmt.level, stmt.module)
                for alias in stmt.names:
                    if alias.name == "*":
                        stars.append(source)
                    elif (alias.asname or alias.name) == name:
                        found = ("from", source, alias.name)
        if isinstance(found, Resolved):
            return found
        if isinstance(found, tuple):
            if found[0] == "module":
                return self._module_ref(found[1])
            if found[0] == "from":
                own = self.module(f"{found[1]}.{found[2]}") if found[1] == module.name else None
                if own is not None:  # `from torch_npu import profiler` in torch_npu/__init__.py: its own submodule
                    return Resolved("module", module=own)
                return self.member(found[1], found[2], depth + 1)
            return self.evaluate(module, found[1], depth + 1)
        sub = self.module(f"{module.name}.{name}")
        if sub is not None:
            return Resolved("module", module=sub)
        for source in stars:
            star = self.module(source)
            if star is None or name.startswith("_"):
                continue
            exported = _all_names(star.tree)
            if exported is not None and name not in exported:
                continue
            try:
                return self.lookup(star, name, depth + 1)
            except Missing:
                continue
        raise Missing(f"{module.name} defines no {name!r}")

    def _module_ref(self, name: str) -> Resolved:
        mod = self.module(name)
        if mod is None:
            return Resolved("dynamic", extra={"why": f"module {name} outside torch_npu"})
        return Resolved("module", module=mod)

    def member(self, module_name: str, name: str, depth: int = 0) -> Resolved:
        mod = self.module(module_name)
        if mod is None:
            sub = self.module(f"{module_name}.{name}")
            if sub is not None:
                return Resolved("module", module=sub)
            if module_name.split(".")[0] not in ("torch_npu", "torchair"):
                return Resolved("dynamic", extra={"why": f"from {module_name}"})
            raise Missing(f"no module {module_name}")
        return self.lookup(mod, name, depth)

    def evaluate(self, module: _Module, expr: ast.AST, depth: int = 0) -> Resolved:
        if isinstance(expr, ast.Name):
            return self.lookup(module, expr.id, depth + 1)
        if isinstance(expr, ast.Attribute):
            return self.attribute(self.evaluate(module, expr.value, depth + 1), expr.attr, depth + 1)
        if isinstance(expr, ast.Call):
            callee = self.evaluate(module, expr.func, depth + 1)
            if callee.kind == "class":
                return Resolved("instance", callee.node, callee.module)
            return Resolved("dynamic", extra={"why": "a call's result"})
        return Resolved("value", expr, module)

    # attributes -----------------------------------------------------------------------------------------------------
    def attribute(self, base: Resolved, name: str, depth: int = 0) -> Resolved:
        if base.kind == "module":
            return self.lookup(base.module, name, depth)
        if base.kind in ("class", "instance"):
            return self._class_attribute(base.node, base.module, name, instance=base.kind == "instance", depth=depth)
        if base.kind == "dynamic":
            return base
        raise Missing(f"{name!r} asked of a {base.kind}")

    def _class_attribute(self, cls: ast.ClassDef, module: _Module, name: str, instance: bool, depth: int) -> Resolved:
        for stmt in cls.body:
            if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)) and stmt.name == name:
                decorators = {getattr(d, "id", getattr(d, "attr", None)) for d in stmt.decorator_list}
                if "property" in decorators:
                    return Resolved("value", stmt, module)
                bound = instance or "classmethod" in decorators
                return Resolved("function", stmt, module, bound=bound and "staticmethod" not in decorators)
            if isinstance(stmt, ast.ClassDef) and stmt.name == name:
                return Resolved("class", stmt, module)
            if isinstance(stmt, (ast.Assign, ast.AnnAssign)):
                targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
                if any(isinstance(t, ast.Name) and t.id == name for t in targets):
                    value = stmt.value
                    return self._value(module, value, depth) if value is not None else Resolved("value")
        if instance:
            for fn in cls.body:
                if isinstance(fn, ast.FunctionDef):
                    for node in ast.walk(fn):
                        if isinstance(node, (ast.Assign, ast.AnnAssign)):
                            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                            for t in targets:
                                if (
                                    isinstance(t, ast.Attribute)
                                    and t.attr == name
                                    and getattr(t.value, "id", None) == "self"
                                ):
                                    return self._value(module, node.value, depth, owner=(cls, fn))
            for fn in cls.body:  # __getattr__ / __setattr__ that test `name == "<this>"`
                if isinstance(fn, ast.FunctionDef) and fn.name in ("__getattr__", "__setattr__", "__getattribute__"):
                    if any(isinstance(c, ast.Constant) and c.value == name for c in ast.walk(fn)):
                        return Resolved("value", fn, module, extra={"via": fn.name})
        for base in cls.bases:
            try:
                resolved = self.evaluate(module, base, depth + 1)
            except Missing:
                continue
            if resolved.kind == "class":
                try:
                    return self._class_attribute(resolved.node, resolved.module, name, instance, depth + 1)
                except Missing:
                    continue
        raise Missing(f"class {cls.name} ({module.name}) has no attribute {name!r}")

    def _value(self, module: _Module, value: ast.AST | None, depth: int, owner=None) -> Resolved:
        if value is None:
            return Resolved("value")
        if isinstance(value, ast.Call):
            try:
                callee = self.evaluate(module, value.func, depth + 1)
            except Missing:
                return Resolved("value", value, module)
            if callee.kind == "class":
                return Resolved("instance", callee.node, callee.module, extra={"call": value})
        return Resolved("value", value, module)

    def resolve(self, path: tuple[str, ...]) -> Resolved:
        root = self.module(path[0])
        if root is None:
            raise Missing(f"no package {path[0]}")
        current = Resolved("module", module=root)
        for part in path[1:]:
            if part == "()":
                if current.kind == "class":
                    current = Resolved("instance", current.node, current.module)
                else:
                    current = Resolved("dynamic", extra={"why": "a call's result"})
                continue
            current = self.attribute(current, part)
        return current


def _top_level(tree: ast.Module):
    """Module-level statements, including those inside top-level if/try/with blocks."""
    stack = list(tree.body)
    while stack:
        stmt = stack.pop(0)
        if isinstance(stmt, (ast.If, ast.Try, ast.With)):
            for body in ("body", "orelse", "finalbody"):
                stack[:0] = list(getattr(stmt, body, []) or [])
            for handler in getattr(stmt, "handlers", []) or []:
                stack[:0] = list(handler.body)
            continue
        yield stmt


def _all_names(tree: ast.Module) -> set[str] | None:
    names = None
    for stmt in tree.body:
        if isinstance(stmt, (ast.Assign, ast.AugAssign)):
            targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
            if any(isinstance(t, ast.Name) and t.id == "__all__" for t in targets):
                if isinstance(stmt.value, (ast.List, ast.Tuple)):
                    found = {e.value for e in stmt.value.elts if isinstance(e, ast.Constant)}
                    names = found if names is None or isinstance(stmt, ast.Assign) else names | found
                else:
                    return None
    return names


def signature_problem(fn: ast.AST, bound: bool, nargs: int, keywords: tuple[str, ...], open_args: bool) -> str | None:
    """Why a call with `nargs` positional arguments and `keywords` cannot bind to `fn`, or None if it can."""
    if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
        return None
    a = fn.args
    positional = [p.arg for p in a.posonlyargs + a.args]
    if bound and positional:
        positional = positional[1:]
    posonly = len(a.posonlyargs) - (1 if bound and a.posonlyargs else 0)
    if nargs > len(positional) and a.vararg is None:
        return f"takes at most {len(positional)} positional argument(s), {nargs} given"
    names = set(positional[max(posonly, 0) :]) | {p.arg for p in a.kwonlyargs}
    for kw in keywords:
        if kw not in names and a.kwarg is None:
            return f"has no parameter {kw!r} (parameters: {', '.join(positional + [p.arg for p in a.kwonlyargs])})"
    if open_args:
        return None
    given = set(positional[:nargs]) | set(keywords)
    required = positional[: len(positional) - len(a.defaults)]
    required += [p.arg for p, d in zip(a.kwonlyargs, a.kw_defaults) if d is None]
    missing = [p for p in required if p not in given]
    if missing:
        return f"needs {', '.join(missing)}"
    return None


def callable_of(resolved: Resolved) -> tuple[ast.AST | None, bool]:
    """The function a call lands in: the function itself, or a class's __init__ (self bound)."""
    if resolved.kind == "function":
        return resolved.node, resolved.bound
    if resolved.kind == "class":
        for stmt in resolved.node.body:
            if isinstance(stmt, ast.FunctionDef) and stmt.name == "__init__":
                return stmt, True
        return None, True
    return None, False


def option_choices(source: Source, resolved: Resolved) -> list | None:
    """An attribute holding torchair's OptionValue(default, [choices]): the choices, else None."""
    call = resolved.extra.get("call")
    if resolved.kind != "instance" or call is None or getattr(resolved.node, "name", None) != "OptionValue":
        return None
    if len(call.args) > 1 and isinstance(call.args[1], (ast.List, ast.Tuple)):
        return [e.value for e in call.args[1].elts if isinstance(e, ast.Constant)]
    return None


def check_use(source: Source, use: Use) -> str | None:
    """Why `use` does not hold against `source`, or None when it does."""
    try:
        resolved = source.resolve(use.path)
    except Missing as exc:
        return f"{use.dotted()} ({use.where}): {exc}"
    if use.kind == "module" and resolved.kind != "module":
        return f"{use.dotted()} ({use.where}): imported as a module, but it is a {resolved.kind}"
    if use.kind == "call":
        if resolved.kind in ("module", "value") and resolved.extra.get("via") is None:
            if resolved.kind == "module":
                return f"{use.dotted()} ({use.where}): called, but it is a module"
        fn, bound = callable_of(resolved)
        problem = signature_problem(fn, bound, use.nargs, use.keywords, use.open_args) if fn is not None else None
        if problem:
            return f"{use.dotted()} ({use.where}): {problem}"
    if use.kind == "set" and use.value is not None:
        choices = option_choices(source, resolved)
        if choices is not None and use.value not in choices:
            return f"{use.dotted()} = {use.value!r} ({use.where}): not one of {choices}"
    return None


def main() -> int:
    for use in collect_uses():
        extra = f"({use.nargs} args, keywords {list(use.keywords)})" if use.kind == "call" else ""
        print(f"{use.kind:<6} {use.dotted():<48} {use.where} {extra}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
