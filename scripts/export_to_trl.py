"""Write the FlowRL and ExGRPO trainers into a TRL checkout, in the shape TRL gives its experimental trainers.

    python scripts/export_to_trl.py PATH_TO_TRL_CHECKOUT

What it writes into the checkout:
- `trl/experimental/flowrl/` and `trl/experimental/exgrpo/`: every `.py` file of `trl_flowrl/flowrl/` and
  `trl_flowrl/exgrpo/` as they are when the command runs, with TRL's copyright header and the imports rewritten:
  `trl` and `trl_flowrl.{flowrl,exgrpo}` become relative imports of the places they resolve to in the checkout
  (`from trl import GRPOTrainer` -> `from ...trainer.grpo_trainer import GRPOTrainer`), placed where TRL's isort wants
  them. An existing folder of the same name is replaced.
- `docs/source/flowrl_trainer.md` and `docs/source/exgrpo_trainer.md` (from `docs/`), their entries in the
  Experimental section of `docs/source/_toctree.yml` (in alphabetical order), and their papers in
  `docs/source/paper_index.md` (from `docs/paper_index/`), in the GRPO section, after the last paper that is not
  newer (arXiv ids are chronological).
- `tests/experimental/test_flowrl_trainer.py` and `tests/experimental/test_exgrpo_trainer.py` (from
  `docs/upstream_tests/`).
- `FlowRLTrainer` and `ExGRPOTrainer` in `_TELEMETRY_TRAINERS` of `trl/trainer/base_trainer.py`, TRL's allowlist of
  trainer names its usage telemetry may report (any other class is reported as "other"), among the experimental ones.

Running it again gives the same checkout: the folders and pages are rewritten and the index entries replaced in place.

All or nothing: everything is read, rewritten and checked first (a target that is a symbolic link, or a folder where a
file goes, is refused rather than written through or replaced), then written beside its target under a hidden name,
then moved in; a failure at any point puts back what was there. On failure it exits 1 with an `export_to_trl:` message
and the checkout is as it was.

Left out: everything of trl_flowrl outside the two subpackages (rewards, data, tasks, recipes, evaluation, the version
check in `_compat`). It also fails, and writes nothing, when a trainer module imports any of it, imports `trl` with a
form it does not rewrite (`import trl...`, a star import), imports a `trl` name that the checkout does not have (a TRL
version the trainers were not written against), or still names `trl_flowrl` after the rewrite; when a docs page
documents a name that its subpackage does not export; and when a file it reads is not UTF-8 or is Python that this
interpreter cannot parse. Only the standard library is needed to run it.
"""

import argparse
import ast
import contextlib
import os
import re
import secrets
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
PACKAGE = "trl_flowrl"
LINE_LENGTH = 119  # TRL's ruff line length
PAPER_INDEX_SECTION = "## Group Relative Policy Optimization"
PAPER_LINK = re.compile(r"huggingface\.co/papers/(\d{4})\.(\d{4,5})")
TELEMETRY_FILE = Path("trl/trainer/base_trainer.py")
TELEMETRY_SET = "_TELEMETRY_TRAINERS"


@dataclass(frozen=True)
class Algorithm:
    name: str  # the subpackage, trl_flowrl/<name>/ here and trl/experimental/<name>/ in TRL
    title: str  # its title in TRL's docs table of contents

    @property
    def page(self) -> str:
        return f"{self.name}_trainer"


ALGORITHMS = (Algorithm("flowrl", "FlowRL"), Algorithm("exgrpo", "ExGRPO"))
EXPORTED = {algorithm.name for algorithm in ALGORITHMS}


class ExportError(Exception):
    """Something the export cannot carry into TRL; the message says what to change."""


class RestoreError(ExportError):
    """Writing failed mid-way and putting the checkout back failed too; the message says what is where."""


def read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ExportError(
            f"{path} is not UTF-8 text (byte {error.start}: {error.reason}); save it as UTF-8 and run again."
        ) from None
    except OSError as error:
        raise ExportError(f"cannot read {path}: {error.strerror}.") from None


def parse(source: str, path: Path | str) -> ast.Module:
    try:
        return ast.parse(source, filename=str(path))
    except SyntaxError as error:
        python = f"{sys.version_info.major}.{sys.version_info.minor}"
        raise ExportError(
            f"{path}, line {error.lineno}: Python {python} cannot parse it ({error.msg}). If the checkout is written "
            "for a newer Python, run the export with that Python."
        ) from None


# ----------------------------------------------------------------------------------------------------------------------
# The checkout: where a `trl` name is defined, and what a module provides.


class TrlCheckout:
    def __init__(self, root: Path):
        self.root = root
        missing = [
            p
            for p in (
                "trl/__init__.py",
                "trl/trainer/grpo_trainer.py",
                "trl/experimental/__init__.py",
                "docs/source/_toctree.yml",
                "docs/source/paper_index.md",
                "tests/experimental",
            )
            if not (root / p).exists()
        ]
        if missing:
            raise ExportError(f"{root} is not a TRL checkout: it has no {', '.join(missing)}.")
        self._trees = {}

    @property
    def version(self) -> str:
        path = self.root / "VERSION"
        return read_text(path).strip() if path.is_file() else "unknown (no VERSION file)"

    def module_file(self, parts: list[str]) -> Path | None:
        base = self.root.joinpath(*parts)
        for path in (base.with_suffix(".py"), base / "__init__.py"):
            if path.is_file():
                return path
        return None

    def _tree(self, path: Path) -> ast.Module:
        if path not in self._trees:
            self._trees[path] = parse(read_text(path), path)
        return self._trees[path]

    def provides(self, parts: list[str], name: str) -> bool:
        """Whether `from <parts> import <name>` works in the checkout (a definition, a re-export or a submodule)."""
        if self.module_file(parts + [name]) is not None:
            return True
        path = self.module_file(parts)
        if path is None:
            return False
        return name in _bound_names(self._tree(path)) or self.defining_module(parts, name) is not None

    def defining_module(self, parts: list[str], name: str, depth: int = 0) -> list[str] | None:
        """The module that defines `name`, following the lazy `_import_structure` tables and relative re-exports."""
        path = self.module_file(parts)
        if path is None or depth > 8:
            return None
        tree = self._tree(path)
        if name in _defined_names(tree):
            return parts
        is_package = path.name == "__init__.py"
        for submodule, names in _import_structure(tree).items():
            if name in names:
                return self.defining_module(parts + submodule.split("."), name, depth + 1)
        for node in _top_level_statements(tree):
            if isinstance(node, ast.ImportFrom) and node.level and any(a.name == name for a in node.names):
                package = parts if is_package else parts[:-1]
                base = package[: len(package) - (node.level - 1)]
                return self.defining_module(base + (node.module.split(".") if node.module else []), name, depth + 1)
        return None


def _top_level_statements(tree: ast.Module):
    """Module-level statements, including those inside top-level `if`/`try` blocks (TYPE_CHECKING, optional deps)."""
    stack = list(tree.body)
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, ast.If | ast.Try):
            stack.extend(node.body + node.orelse + getattr(node, "finalbody", []))
            for handler in getattr(node, "handlers", []):
                stack.extend(handler.body)


def _defined_names(tree: ast.Module) -> set[str]:
    names = set()
    for node in _top_level_statements(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name))
    return names


def _bound_names(tree: ast.Module) -> set[str]:
    names = _defined_names(tree)
    for node in _top_level_statements(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
    return names


def _import_structure(tree: ast.Module) -> dict[str, list[str]]:
    """TRL's lazy-module table, `_import_structure = {"submodule": ["Name", ...]}`, where the module has one."""
    for node in _top_level_statements(tree):
        if (
            isinstance(node, ast.Assign)
            and any(isinstance(t, ast.Name) and t.id == "_import_structure" for t in node.targets)
            and isinstance(node.value, ast.Dict)
        ):
            try:
                return ast.literal_eval(node.value)
            except ValueError:
                return {}
    return {}


# ----------------------------------------------------------------------------------------------------------------------
# Rewriting one module's imports.


@dataclass
class Statement:
    """`from <'.' * level><module> import <names>`, relative to the exported file's package."""

    level: int
    module: str
    names: list[str]  # "name" or "name as alias"

    def render(self, indent: str = "") -> str:
        head = f"{indent}from {'.' * self.level}{self.module} import "
        line = head + ", ".join(self.names)
        if len(line) <= LINE_LENGTH:
            return line
        body = "".join(f"{indent}    {name},\n" for name in self.names)
        return f"{head}(\n{body}{indent})"


def _name_sort_key(name: str):
    # ruff's isort with `order-by-type`: CONSTANTS, then Classes, then everything else.
    bare = name.split(" as ")[0].lstrip("_")
    kind = 0 if bare.isupper() else 1 if bare[:1].isupper() else 2
    return kind, name.lower()


class ModuleRewriter:
    def __init__(self, checkout: TrlCheckout, subpackage: str, relative_path: Path):
        self.checkout = checkout
        self.where = f"{PACKAGE}/{subpackage}/{relative_path.as_posix()}"
        inner = list(relative_path.parent.parts)
        self.our_package = [PACKAGE, subpackage, *inner]
        self.trl_package = ["trl", "experimental", subpackage, *inner]

    def fail(self, node: ast.AST, message: str):
        raise ExportError(f"{self.where}, line {node.lineno}: {message}")

    def statements(self, node: ast.Import | ast.ImportFrom) -> list[Statement] | None:
        """The statements that replace `node` in TRL, or None when it stays as it is (stdlib and third party)."""
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in ("trl", PACKAGE):
                    self.fail(
                        node, f"`import {alias.name}`: write it as `from ... import ...`, which the export maps."
                    )
            return None
        names = [a.name if a.asname is None else f"{a.name} as {a.asname}" for a in node.names]
        if node.level:
            if node.level > len(self.our_package):
                self.fail(node, "relative import beyond the top of the package.")
            base = self.our_package[: len(self.our_package) - (node.level - 1)]
            target = base + (node.module.split(".") if node.module else [])
        else:
            target = node.module.split(".")
        if target[0] not in ("trl", PACKAGE):
            return None
        if any(a.name == "*" for a in node.names):
            self.fail(node, "star imports of trl or trl_flowrl are not exported; import the names.")

        if target[0] == PACKAGE:
            if len(target) == 1 and all(a.name in EXPORTED for a in node.names):
                return [self._relative(["trl", "experimental"], names)]
            if len(target) == 1 or target[1] not in EXPORTED:
                self.fail(
                    node,
                    f"imports {'.'.join(target)}, which is not exported to TRL (only {PACKAGE}."
                    f"{{{','.join(sorted(EXPORTED))}}} are). Move what the trainer needs into its subpackage.",
                )
            trl_target = ["trl", "experimental", *target[1:]]
            if not (REPO.joinpath(*target).is_dir() or REPO.joinpath(*target).with_suffix(".py").is_file()):
                self.fail(node, f"{'.'.join(target)} does not exist.")
            return [self._relative(trl_target, names)]

        # A `trl` import: check it against the checkout, and import names of `trl` itself from where they live.
        if target == ["trl"]:
            by_module: dict[tuple[str, ...], list[str]] = {}
            for alias, name in zip(node.names, names, strict=True):
                module = self.checkout.defining_module(["trl"], alias.name)
                if module is None:
                    self._missing(node, "trl", alias.name)
                by_module.setdefault(tuple(module), []).append(name)
            return [self._relative(list(module), group) for module, group in by_module.items()]
        if target[:2] == ["trl", "experimental"] and len(target) > 2 and target[2] in EXPORTED:
            return [self._relative(target, names)]
        if self.checkout.module_file(target) is None:
            self._missing(node, ".".join(target), None)
        for alias in node.names:
            if not self.checkout.provides(target, alias.name):
                self._missing(node, ".".join(target), alias.name)
        return [self._relative(target, names)]

    def _missing(self, node, module: str, name: str | None):
        what = f"`{name}` from {module}" if name else module
        self.fail(
            node,
            f"imports {what}, which the TRL checkout {self.checkout.root} does not have (TRL version "
            f"{self.checkout.version}). The trainers are written against the TRL version pinned in pyproject.toml; "
            "port them to the checkout's TRL first.",
        )

    def _relative(self, target: list[str], names: list[str]) -> Statement:
        common = 0
        while common < min(len(target), len(self.trl_package)) and target[common] == self.trl_package[common]:
            common += 1
        return Statement(len(self.trl_package) - common + 1, ".".join(target[common:]), names)

    def trailing_comment(self, node: ast.AST, lines: list[str]) -> str:
        rest = lines[node.end_lineno - 1][node.end_col_offset :].strip()
        if rest and not rest.startswith("#"):
            self.fail(node, "an import that shares its line with other code; put it on a line of its own.")
        return f"  {rest}" if rest else ""

    def rewrite(self, source: str) -> str:
        tree = parse(source, self.where)
        lines = source.splitlines(keepends=True)

        # The leading block of imports: TRL's isort puts relative imports in a section of their own, after the third
        # party ones, so the rewritten `trl` imports move there, next to the subpackage's own relative imports.
        header = []
        for index, node in enumerate(tree.body):
            is_docstring = index == 0 and isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
            if not (is_docstring or isinstance(node, ast.Import | ast.ImportFrom)):
                break
            header.append(node)

        # Imports elsewhere (inside functions, after code) are rewritten where they are, bottom-up.
        header_ids = {id(node) for node in header}
        others = [n for n in ast.walk(tree) if isinstance(n, ast.Import | ast.ImportFrom) and id(n) not in header_ids]
        for node in sorted(others, key=lambda n: n.lineno, reverse=True):
            statements = self.statements(node)
            if statements is None or (
                isinstance(node, ast.ImportFrom)
                and len(statements) == 1
                and (statements[0].level, statements[0].module) == (node.level, node.module or "")
            ):
                continue  # not a trl import, or a relative import that stays as written
            first = lines[node.lineno - 1]
            indent = first[: len(first) - len(first.lstrip())]
            comment = self.trailing_comment(node, lines)
            if node.col_offset != len(indent):
                self.fail(node, "an import that shares its line with other code; put it on a line of its own.")
            rendered = [s.render(indent) for s in statements]
            rendered[-1] += comment
            lines[node.lineno - 1 : node.end_lineno] = [line + "\n" for line in rendered]

        relative: dict[tuple[int, str], Statement] = {}
        unchanged: dict[tuple[int, str], str] = {}  # a relative import kept as written, with its comments
        drop = set()
        for node in header:
            if not isinstance(node, ast.Import | ast.ImportFrom):
                continue
            statements = self.statements(node)
            if statements is None:
                continue  # stdlib or third party: stays where it is
            drop.update(range(node.lineno - 1, node.end_lineno))
            for statement in statements:
                key = (statement.level, statement.module)
                if key in relative:
                    relative[key].names = sorted(set(relative[key].names) | set(statement.names), key=_name_sort_key)
                    unchanged.pop(key, None)
                else:
                    relative[key] = statement
                    if len(statements) == 1 and node.level == statement.level and (node.module or "") == key[1]:
                        unchanged[key] = "".join(lines[node.lineno - 1 : node.end_lineno]).rstrip("\n")
                    elif len(statements) == 1:
                        unchanged[key] = statement.render() + self.trailing_comment(node, lines)

        if header and drop:
            end = header[-1].end_lineno
            kept, previous_blank = [], False
            for i in range(end):
                if i in drop:
                    continue
                blank = not lines[i].strip()
                if not (blank and previous_blank):
                    kept.append(lines[i])
                previous_blank = blank
            while kept and not kept[-1].strip():
                kept.pop()
            block = [
                unchanged.get(key, relative[key].render()) + "\n"
                for key in sorted(relative, key=lambda k: (-k[0], k[1]))
            ]
            lines = kept + (["\n"] if kept else []) + block + lines[end:]

        result = "".join(lines)
        try:
            ast.parse(result)
        except SyntaxError as error:  # a bug of this script, not of the module
            raise ExportError(f"{self.where}: the rewritten module does not parse ({error}).") from error
        leftovers = [
            f"line {i}: {line.strip()}"
            for i, line in enumerate(result.splitlines(), 1)
            if PACKAGE in line or "trl-flowrl" in line
        ]
        if leftovers:
            raise ExportError(
                f"{self.where} still refers to this package after the rewrite, which would dangle in TRL; reword "
                "or remove:\n  " + "\n  ".join(leftovers)
            )
        return result


# ----------------------------------------------------------------------------------------------------------------------
# Docs: the table of contents and the paper index.


def insert_toc_entry(text: str, local: str, title: str) -> str:
    """Add `local` under the Experimental section of `_toctree.yml`, in alphabetical order of titles (after the
    overview, which stays first). An entry already there only gets its title updated."""
    lines = text.splitlines(keepends=True)
    end = next((i for i, line in enumerate(lines) if line.rstrip() == "  title: Experimental"), None)
    starts = [i for i in range(end or 0) if lines[i].rstrip() == "- sections:"]
    if end is None or not starts:
        raise ExportError("docs/source/_toctree.yml has no Experimental section (`  title: Experimental`).")
    entries = []  # (line index, local, title)
    for i in range(starts[-1] + 1, end):
        match = re.match(r"  - local: (\S+)", lines[i])
        title_match = re.match(r"    title: (.+)", lines[i + 1]) if match else None
        if match and title_match:
            entries.append((i, match.group(1), title_match.group(1).strip()))
    for i, existing, _ in entries:
        if existing == local:
            lines[i + 1] = f"    title: {title}\n"
            return "".join(lines)
    position = next((i for i, _, t in entries[1:] if t.lower() > title.lower()), end)
    lines[position:position] = [f"  - local: {local}\n", f"    title: {title}\n"]
    return "".join(lines)


def _paper_id(text: str) -> tuple[int, int] | None:
    match = PAPER_LINK.search(text)
    return (int(match.group(1)), int(match.group(2))) if match else None


def _markdown_blocks(lines: list[str]):
    """(start, end, heading) of every `##` and `###` heading's block, code fences skipped."""
    headings, fenced = [], False
    for i, line in enumerate(lines):
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced and (line.startswith("## ") or line.startswith("### ")):
            headings.append(i)
    bounds = headings + [len(lines)]
    return [(start, bounds[k + 1], lines[start].rstrip("\n")) for k, start in enumerate(headings)]


def insert_paper_entry(text: str, entry: str) -> str:
    """Put `entry` (a `### Title` block with a huggingface.co/papers link) into the paper index: in place of the
    entry of the same paper if there is one, else in the GRPO section after the last paper that is not newer."""
    paper = _paper_id(entry)
    if not entry.startswith("### ") or paper is None:
        raise ExportError("A paper-index entry must start with `### <title>` and link huggingface.co/papers/<id>.")
    entry_lines = (entry.rstrip("\n") + "\n\n").splitlines(keepends=True)
    lines = text.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"
    blocks = _markdown_blocks(lines)
    for start, end, heading in blocks:
        if heading.startswith("### ") and _paper_id("".join(lines[start:end])) == paper:
            lines[start:end] = entry_lines
            return "".join(lines)

    section = next((k for k, (_, _, h) in enumerate(blocks) if h.rstrip() == PAPER_INDEX_SECTION), None)
    if section is None:
        raise ExportError(f"docs/source/paper_index.md has no `{PAPER_INDEX_SECTION}` section.")
    members = []
    for start, end, heading in blocks[section + 1 :]:
        if heading.startswith("## "):
            break
        members.append((start, end))
    section_end = members[-1][1] if members else blocks[section][1]
    dated = [(end, _paper_id("".join(lines[start:end]))) for start, end in members]
    older = [end for end, date in dated if date is not None and date <= paper]  # entries with no paper link: skipped
    if older:
        position = older[-1]
    elif members:
        position = members[0][0]
    else:
        position = section_end
    lines[position:position] = entry_lines
    return "".join(lines)


def check_autodoc(page: str, algorithm: Algorithm):
    """Every `[[autodoc]] experimental.<name>.<Object>` of a page must be exported by the subpackage."""
    init_path = REPO / PACKAGE / algorithm.name / "__init__.py"
    init = parse(read_text(init_path), init_path)
    exported = _bound_names(init)
    targets = re.findall(rf"\[\[autodoc\]\] experimental\.{algorithm.name}\.(\w+)", page)
    if not targets:
        raise ExportError(f"docs/{algorithm.page}.md has no `[[autodoc]] experimental.{algorithm.name}.*` entry.")
    unknown = [t for t in targets if t not in exported]
    if unknown:
        raise ExportError(
            f"docs/{algorithm.page}.md documents {', '.join(unknown)}, which {PACKAGE}/{algorithm.name}/__init__.py "
            "does not export."
        )


# ----------------------------------------------------------------------------------------------------------------------


def copyright_header(checkout: TrlCheckout) -> str:
    """TRL's license header, as its own files carry it (its `make precommit` checks that every file starts with it)."""
    header = []
    for line in read_text(checkout.root / "trl" / "__init__.py").splitlines(keepends=True):
        if not line.startswith("#"):
            break
        header.append(line)
    text = "".join(header)
    if "Licensed under the Apache License" not in text:
        raise ExportError(f"{checkout.root}/trl/__init__.py does not start with TRL's Apache license header.")
    return text


def with_header(header: str, source: str) -> str:
    if source.startswith("# Copyright"):
        return source
    return header + "\n" + source


def register_telemetry(text: str, path: Path, trainers: list[str]) -> str | None:
    """Add `trainers` to TRL's `_TELEMETRY_TRAINERS` allowlist (a trainer outside it is reported as "other"), one per
    line among the experimental ones, in TRL's case-insensitive order. None when the checkout has no such set."""
    for trainer in trainers:
        tree = parse(text, path)
        node = next(
            (
                n
                for n in tree.body
                if isinstance(n, ast.Assign)
                and any(isinstance(t, ast.Name) and t.id == TELEMETRY_SET for t in n.targets)
            ),
            None,
        )
        if node is None:
            return None
        elements = node.value.elts if isinstance(node.value, ast.Set) else []
        names = [e.value for e in elements if isinstance(e, ast.Constant) and isinstance(e.value, str)]
        lines = text.splitlines(keepends=True)
        if (
            not elements
            or len(names) != len(elements)
            or len({e.lineno for e in elements} | {node.lineno}) != len(elements) + 1
            or any(e.lineno != e.end_lineno for e in elements)
        ):
            raise ExportError(
                f"{path}: `{TELEMETRY_SET}` is not a set literal with one trainer name per line, which the export "
                f"edits; add {', '.join(repr(t) for t in trainers)} to it by hand and run again."
            )
        if trainer in names:
            continue
        # TRL lists the stable trainers, then, after a `# Experimental` comment, the experimental ones.
        marker = next(
            (i for i in range(node.lineno, node.end_lineno) if lines[i - 1].strip().lower() == "# experimental"), 0
        )
        section = [e for e in elements if e.lineno > marker] or elements
        following = next((e for e in section if e.value.lower() > trainer.lower()), None)
        anchor = following or section[-1]
        indent = lines[anchor.lineno - 1][: anchor.col_offset]
        if following is not None:
            position = following.lineno - 1
        else:
            position = anchor.lineno
            last = lines[anchor.lineno - 1]
            if not last[anchor.end_col_offset :].lstrip().startswith(","):
                lines[anchor.lineno - 1] = last[: anchor.end_col_offset] + "," + last[anchor.end_col_offset :]
        lines.insert(position, f'{indent}"{trainer}",\n')
        text = "".join(lines)
    return text


def plan_export(checkout: TrlCheckout) -> tuple[dict[Path, dict[Path, str]], dict[Path, str], list[str]]:
    """Everything to write, computed before anything is written: the folders that are replaced as a whole,
    {folder: {path inside it: text}}, the files, {path: text} (paths in the checkout), and notes."""
    header = copyright_header(checkout)
    folders, files, notes = {}, {}, []
    toc = read_text(checkout.root / "docs/source/_toctree.yml")
    index = read_text(checkout.root / "docs/source/paper_index.md")
    trainers = []
    for algorithm in ALGORITHMS:
        source_dir = REPO / PACKAGE / algorithm.name
        folder = folders.setdefault(Path("trl/experimental", algorithm.name), {})
        for path in sorted(source_dir.rglob("*")):
            relative = path.relative_to(source_dir)
            if "__pycache__" in relative.parts or path.is_dir():
                continue
            if path.suffix != ".py":
                notes.append(f"not exported (not a .py file): {path.relative_to(REPO)}")
                continue
            rewriter = ModuleRewriter(checkout, algorithm.name, relative)
            code = rewriter.rewrite(read_text(path))
            folder[relative] = with_header(header, code)
        init_path = source_dir / "__init__.py"
        trainers += sorted(n for n in _bound_names(parse(read_text(init_path), init_path)) if n.endswith("Trainer"))

        page = read_text(REPO / "docs" / f"{algorithm.page}.md")
        check_autodoc(page, algorithm)
        files[Path("docs/source", f"{algorithm.page}.md")] = page
        toc = insert_toc_entry(toc, algorithm.page, algorithm.title)
        index = insert_paper_entry(index, read_text(REPO / "docs/paper_index" / f"{algorithm.name}.md"))

        test = read_text(REPO / "docs/upstream_tests" / f"test_{algorithm.name}_trainer.py")
        files[Path("tests/experimental", f"test_{algorithm.name}_trainer.py")] = with_header(header, test)
    files[Path("docs/source/_toctree.yml")] = toc
    files[Path("docs/source/paper_index.md")] = index
    telemetry_path = checkout.root / TELEMETRY_FILE
    telemetry = register_telemetry(read_text(telemetry_path), telemetry_path, trainers)
    if telemetry is None:
        notes.append(f"{TELEMETRY_FILE} has no `{TELEMETRY_SET}` set: no telemetry allowlist to add the trainers to")
    else:
        files[TELEMETRY_FILE] = telemetry
    return folders, files, notes


# ----------------------------------------------------------------------------------------------------------------------
# Writing: all or nothing.


def check_target(root: Path, relative: Path, folder: bool):
    """Refuse a target the export would write through (a symbolic link) or clobber (a folder where a file goes, or
    the other way round), before anything is written."""
    path = root
    for part in relative.parts:
        path = path / part
        if path.is_symlink():
            raise ExportError(
                f"{path} is a symbolic link (to {os.readlink(path)}), and the export would write through it into "
                "whatever it points to. Remove the link (the export then writes a real "
                f"{'folder' if folder else 'file'} there) and run again."
            )
    existing = path.parent
    while not existing.exists():  # missing folders are created when writing (and removed again on failure)
        existing = existing.parent
    if not existing.is_dir():
        raise ExportError(f"{existing} is not a folder; the export writes {relative} under it.")
    if folder and path.exists() and not path.is_dir():
        raise ExportError(f"{path} is not a folder, and the export writes the folder {relative} there; move it away.")
    if not folder and path.exists() and not path.is_file():
        raise ExportError(
            f"{path} is not a regular file (a folder?), and the export writes a file there; move it away."
        )


def _write_new(path: Path, text: str):
    try:
        with open(path, "x", encoding="utf-8", newline="") as handle:  # "x": never into something already there
            handle.write(text)
    except FileExistsError:
        raise  # not ours to remove
    except BaseException:
        path.unlink(missing_ok=True)  # written in part by this call
        raise


def _remove(path: Path):
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def write_checkout(root: Path, folders: dict[Path, dict[Path, str]], files: dict[Path, str]) -> list[str]:
    """Write everything or change nothing. Each target is first written beside itself under a hidden name; then every
    target is moved aside and its new version moved in (renames within one folder). Missing parent folders are created
    first. Any failure moves the old versions back and removes the created folders. Returns notes (backups that could
    not be removed after success)."""
    token = secrets.token_hex(4)

    def aside(path: Path, kind: str) -> Path:
        return path.with_name(f".{path.name}.export-{kind}-{token}")

    staged = []  # (new version, target); only what this call created, so that discarding it never loses anything
    created = []  # parent folders this call created, outermost first
    try:
        for relative, contents in folders.items():
            target = root / relative
            _make_parents(target, created)
            new = aside(target, "new")
            new.mkdir()
            staged.append((new, target))
            for inner, text in sorted(contents.items()):
                (new / inner).parent.mkdir(parents=True, exist_ok=True)
                _write_new(new / inner, text)
        for relative, text in files.items():
            target = root / relative
            _make_parents(target, created)
            new = aside(target, "new")
            _write_new(new, text)
            staged.append((new, target))
            if target.is_file():
                shutil.copymode(target, new)
    except OSError as error:
        _discard(new for new, _ in staged)
        _discard_folders(created)
        raise ExportError(
            f"cannot write {error.filename or 'into the checkout'}: {error.strerror}. Make the checkout writable "
            "(and free space) and run again."
        ) from None
    except BaseException:
        _discard(new for new, _ in staged)
        _discard_folders(created)
        raise

    moved = []  # (target, its old version moved aside, or None where there was none)
    try:
        for new, target in staged:
            old = aside(target, "old") if target.exists() else None
            if old is not None:
                os.rename(target, old)
            moved.append((target, old))
            os.rename(new, target)
    except BaseException as error:
        failures = _roll_back(moved)
        _discard(new for new, _ in staged)
        _discard_folders(created)
        if failures:
            raise RestoreError(
                f"writing failed ({error!r}), and these could not be put back: " + "; ".join(failures)
            ) from error
        if isinstance(error, OSError):
            raise ExportError(
                f"cannot write {error.filename}: {error.strerror}. Make the checkout writable and run again."
            ) from None
        raise

    notes = []
    for _, old in moved:
        if old is not None:
            try:
                _remove(old)
            except OSError as error:
                notes.append(f"could not remove the previous version, {old}: {error.strerror}; remove it by hand")
    return notes


def _discard(paths):
    for path in paths:
        # Best effort: a staged copy under a hidden name, never a file of the checkout.
        with contextlib.suppress(OSError):
            _remove(path)


def _make_parents(path: Path, created: list[Path]):
    missing = []
    parent = path.parent
    while not parent.exists():
        missing.append(parent)
        parent = parent.parent
    for folder in reversed(missing):
        folder.mkdir()
        created.append(folder)


def _discard_folders(created: list[Path]):
    for folder in reversed(created):
        # rmdir removes only an empty folder: whatever someone else put there since is kept, with its folder.
        with contextlib.suppress(OSError):
            folder.rmdir()


def _roll_back(moved: list[tuple[Path, Path | None]]) -> list[str]:
    failures = []
    for target, old in reversed(moved):
        try:
            if old is None or old.exists():
                _remove(target)
            if old is not None:
                os.rename(old, target)
        except OSError as error:
            failures.append(f"{target} ({error.strerror}; its previous version is {old})")
    return failures


def export(checkout_root: Path) -> list[Path]:
    checkout = TrlCheckout(Path(checkout_root).resolve())
    folders, files, notes = plan_export(checkout)
    for relative in folders:
        check_target(checkout.root, relative, folder=True)
    for relative in files:
        check_target(checkout.root, relative, folder=False)
    notes += write_checkout(checkout.root, folders, files)
    for note in notes:
        print(f"note: {note}")
    return sorted([folder / inner for folder, contents in folders.items() for inner in contents] + list(files))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkout", type=Path, help="root of a TRL git checkout (the folder holding trl/ and docs/)")
    args = parser.parse_args(argv)
    try:
        written = export(args.checkout)
    except RestoreError as error:
        print(f"export_to_trl: {error}", file=sys.stderr)
        return 1
    except (ExportError, OSError) as error:  # an OSError here comes before anything is written
        print(f"export_to_trl: {error}\nNothing in the checkout was changed.", file=sys.stderr)
        return 1
    print(f"Wrote {len(written)} files into {args.checkout.resolve()}:")
    for path in written:
        print(f"  {path}")
    print(
        "Next, in the checkout: `make precommit`, then `pytest tests/experimental/test_flowrl_trainer.py "
        "tests/experimental/test_exgrpo_trainer.py` (see CONTRIBUTING.md, 'Upstreaming to TRL')."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
