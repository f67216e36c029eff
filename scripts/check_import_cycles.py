"""Fail if modules of a package import each other in a cycle.

    python scripts/check_import_cycles.py [--allow SUBPACKAGE ...] [TOP_LEVEL_PACKAGE]

import-linter's layers contracts (``make lint``, pyproject.toml) keep the tiers in
order but do not look inside a tier; this looks at every module. It counts every
import grimp finds, at module level and inside functions, except those under
``if TYPE_CHECKING:`` (they never run, and a ``Protocol`` or a string annotation
removes them without changing the design). Each cycle, a group of modules that
all reach one another, is printed under the package that holds it, with the
imports that make it.

``--allow app.worker`` reports the cycles that lie wholly inside ``app.worker``
without failing: a temporary allowance while the worker is restructured.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Iterator

import grimp


def strongly_connected(graph: grimp.ImportGraph) -> list[list[str]]:
    """The groups of two or more modules that each reach one another (Tarjan's algorithm)."""

    def imports(module: str) -> Iterator[str]:
        return iter(sorted(graph.find_modules_directly_imported_by(module)))

    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)

    for root in sorted(graph.modules):
        if root in index:
            continue
        visit(root)
        # Iterative, not recursive: each frame is a module and its imports still to look at.
        work = [(root, imports(root))]
        while work:
            module, imported = work[-1]
            for child in imported:
                if child not in index:
                    visit(child)
                    work.append((child, imports(child)))
                    break
                if child in stack:
                    low[module] = min(low[module], index[child])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[module])
                if low[module] == index[module]:
                    group = stack[stack.index(module) :]
                    del stack[stack.index(module) :]
                    if len(group) > 1:
                        groups.append(sorted(group))
    return groups


def common_package(modules: Iterable[str]) -> str:
    parts = [m.split(".")[:-1] for m in modules]
    common: list[str] = []
    for names in zip(*parts, strict=False):
        if len(set(names)) > 1:
            break
        common.append(names[0])
    return ".".join(common)


def inside(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def describe(graph: grimp.ImportGraph, group: list[str]) -> list[str]:
    members = set(group)
    lines = []
    for importer in group:
        for imported in sorted(graph.find_modules_directly_imported_by(importer) & members):
            details = graph.get_import_details(importer=importer, imported=imported)
            at = ", ".join(f"l.{d['line_number']}" for d in details)
            lines.append(f"    {importer} -> {imported} ({at})")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("package", nargs="?", default="app", help="default: app")
    parser.add_argument(
        "--allow",
        action="append",
        default=[],
        metavar="SUBPACKAGE",
        help="report cycles wholly inside SUBPACKAGE without failing (repeatable)",
    )
    args = parser.parse_args(argv)
    graph = grimp.build_graph(args.package, exclude_type_checking_imports=True)
    groups = sorted(strongly_connected(graph), key=lambda group: (common_package(group), group))
    failed = False
    for group in groups:
        allowed = any(all(inside(m, a) for m in group) for a in args.allow)
        failed = failed or not allowed
        verdict = "allowed for now (--allow)" if allowed else "not allowed"
        print(f"{common_package(group)}: {len(group)} modules import each other, {verdict}:")
        print("\n".join(describe(graph, group)))
    for allowance in args.allow:
        if not any(all(inside(m, allowance) for m in group) for group in groups):
            print(f"no cycle left in {allowance}: drop `--allow {allowance}`")
    if not groups:
        print(f"no import cycles in {args.package}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
