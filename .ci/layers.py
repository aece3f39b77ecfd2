#!/usr/bin/env python3
"""The layer check: no module reaches up ARCHITECTURE.md's code map.

The code map lists the core's modules bottom-up (`- **`name`** — …` bullets
under "## Code map"), and the Python front's section lists python/src's the
same way; each module may use only itself and the modules listed before it.
This reads both lists, then every `crate::…`, `super::…` and `self::…` path
in src/ and python/src (comments and string literals set aside), resolves it
to the top-level module it names, and fails on each path that reaches a
module listed after its own, naming file:line, both modules and the path.
It also fails when a module the crate root declares is missing from its list,
or the list names a module that does not exist or names one twice, so the
map stays true.

Usage: python3 .ci/layers.py [repository root]. Python 3 standard library only.
"""

import os
import re
import sys
from pathlib import Path

BULLET = re.compile(r"^- \*\*`([^`]+)`\*\*")
MOD_DECL = re.compile(r"^\s*(?:pub(?:\([^)]*\))?\s+)?mod\s+(\w+)\s*;", re.M)
# `pub use module::{A, B};` or `pub use module::A;` at the crate root.
ROOT_REEXPORT = re.compile(r"pub\s+use\s+(\w+)::(\{[^}]*\}|\w+)\s*;")
PATH_START = re.compile(r"(?<![\w$])(\$crate|crate|super|self)\s*::")
IDENT = re.compile(r"\s*(\w+)")
IDENT_CHAR = re.compile(r"\w")
RAW_STRING = re.compile(r'b?r(#*)"')
# A char literal, not a lifetime: one char or escape between quotes.
CHAR = re.compile(r"'(?:\\(?:x\w\w|u\{\w+\}|.)|[^\\'])'")
SEP = re.compile(r"\s*::\s*")
GROUP = re.compile(r"\s*\{")


class Layers:
    """One crate's ordered modules, as a code map lists them."""

    def __init__(self, name, source, order, map_file):
        self.name = name
        self.source = source
        self.order = order
        self.map_file = map_file
        self.rank = {module: i for i, module in enumerate(order)}


def code_map(text, heading):
    """The `- **`name`**` bullets of the section whose heading starts with
    `heading`, in order (names ending in `/` are folders, not modules)."""
    names, inside = [], False
    for line in text.splitlines():
        if line.startswith("## "):
            inside = line[3:].startswith(heading)
            continue
        match = BULLET.match(line) if inside else None
        if match and not match.group(1).endswith("/"):
            names.append(match.group(1))
    return names


def blank_non_code(text):
    """`text` with comments, string and char literals replaced by spaces
    (newlines kept, so line numbers still hold)."""
    out, i, n = [], 0, len(text)

    def blank(start, end):
        out.append("".join(c if c == "\n" else " " for c in text[start:end]))

    while i < n:
        c = text[i]
        if text.startswith("//", i):
            end = text.find("\n", i)
            end = n if end < 0 else end
            blank(i, end)
            i = end
        elif text.startswith("/*", i):
            depth, j = 1, i + 2
            while j < n and depth:
                if text.startswith("/*", j):
                    depth, j = depth + 1, j + 2
                elif text.startswith("*/", j):
                    depth, j = depth - 1, j + 2
                else:
                    j += 1
            blank(i, j)
            i = j
        elif (raw := RAW_STRING.match(text, i)) and not (i and IDENT_CHAR.match(text, i - 1)):
            close = '"' + raw.group(1)
            end = text.find(close, raw.end())
            end = n if end < 0 else end + len(close)
            blank(i, end)
            i = end
        elif c == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            blank(i, j + 1)
            i = j + 1
        elif c == "'" and (char := CHAR.match(text, i)):
            blank(i, char.end())
            i = char.end()
        else:
            out.append(c)
            i += 1
    return "".join(out)


def module_path(file, source):
    """The module path of a file: src/a/b.rs and src/a/b/mod.rs are [a, b]."""
    parts = list(file.relative_to(source).with_suffix("").parts)
    if parts[-1] in ("mod", "lib"):
        parts.pop()
    return parts


def inline_modules(code):
    """The inline `mod name { … }` blocks of `code`, as (start offset, end
    offset, name)."""
    blocks, stack, depth = [], [], 0
    for match in re.finditer(r"\bmod\s+(\w+)\s*\{|[{}]", code):
        token = match.group(0)
        if token.startswith("mod"):
            depth += 1
            stack.append((match.start(), depth, match.group(1)))
        elif token == "{":
            depth += 1
        else:
            if stack and stack[-1][1] == depth:
                start, _, name = stack.pop()
                blocks.append((start, match.end(), name))
            depth -= 1
    return blocks


def enclosing(blocks, offset):
    """The names of the inline modules around `offset`, outermost first."""
    around = [b for b in blocks if b[0] <= offset < b[1]]
    return [name for _, _, name in sorted(around)]


def read_path(code, offset):
    """The segments of the path that starts at `offset`, and a brace group
    that ends it (the group's text, or None)."""
    segments, i = [], offset
    while True:
        ident = IDENT.match(code, i)
        if not ident:
            group = GROUP.match(code, i)
            if not group:
                return segments, None
            depth, j = 1, group.end()
            while j < len(code) and depth:
                depth += {"{": 1, "}": -1}.get(code[j], 0)
                j += 1
            return segments, code[group.end() : j - 1]
        segments.append(ident.group(1))
        i = ident.end()
        sep = SEP.match(code, i)
        if not sep:
            return segments, None
        i = sep.end()


def group_heads(group):
    """The first segment of each path in a `use` brace group."""
    heads, depth, item = [], 0, ""
    for c in group + ",":
        if c == "," and depth == 0:
            first = IDENT.match(item)
            if first:
                heads.append(first.group(1))
            item = ""
            continue
        depth += {"{": 1, "}": -1}.get(c, 0)
        item += c
    return heads


def targets(here, segments, group, reexports):
    """The top-level modules a path from module `here` names: resolved from
    `crate`, `super` and `self`, through the crate root's re-exports. An
    empty name is the crate root itself."""
    path = list(here)
    rest = list(segments)
    while rest and rest[0] in ("crate", "$crate", "super", "self"):
        head = rest.pop(0)
        if head in ("crate", "$crate"):
            path = []
        elif head == "super":
            path = path[:-1]
    if path:
        return [path[0]]
    heads = rest[:1] if rest else (group_heads(group) if group is not None else [])
    return [reexports.get(h, h) for h in heads] or [""]


def violations(layers, reexports, declared):
    """Every path that reaches up the map, and every mismatch between the
    map and the modules the crate root declares."""
    found = []
    for module in declared:
        if module not in layers.rank:
            found.append(
                f"{layers.source}: module `{module}` is declared but not in "
                f"{layers.map_file}'s list of {layers.name} modules: add it where it belongs"
            )
    for module in sorted({m for m in layers.order if layers.order.count(m) > 1}):
        found.append(
            f"{layers.map_file}: the list of {layers.name} modules names `{module}` "
            f"{layers.order.count(module)} times: keep it once, where it belongs"
        )
    for module in layers.order:
        if module not in declared:
            found.append(
                f"{layers.map_file}: the list of {layers.name} modules names `{module}`, "
                f"which {layers.source} does not have"
            )
    root = layers.source / "lib.rs"
    for file in sorted(layers.source.rglob("*.rs")):
        if file in (root, layers.source / "main.rs"):
            continue
        found.extend(file_violations(layers, reexports, file))
    return found


def file_violations(layers, reexports, file):
    """The paths of one file that reach up the map."""
    code = blank_non_code(file.read_text(encoding="utf-8"))
    blocks = inline_modules(code)
    base = module_path(file, layers.source)
    own = base[0]
    found = []
    if own not in layers.rank:
        return found  # reported once, as missing from the list
    for start in PATH_START.finditer(code):
        segments, group = read_path(code, start.start())
        here = base + enclosing(blocks, start.start())
        for target in targets(here, segments, group, reexports):
            if target == own:
                continue
            line = code.count("\n", 0, start.start()) + 1
            path = "::".join(segments) + ("::{…}" if group is not None else "")
            where = f"{file}:{line}: `{own}`"
            if target == "":
                found.append(f"{where} uses the crate root's `{path}`, which no module of the map owns")
            elif target not in layers.rank:
                found.append(f"{where} uses `{target}` (`{path}`), which is not a module of the map")
            elif layers.rank[target] > layers.rank[own]:
                found.append(
                    f"{where} must not reach `{target}` (`{path}`): "
                    f"{layers.map_file} lists `{target}` after `{own}`"
                )
    return found


def check():
    """Every problem of the repository in the current directory."""
    arch = Path("ARCHITECTURE.md").read_text(encoding="utf-8")
    crates = [
        Layers("core", Path("src"), code_map(arch, "Code map"), "ARCHITECTURE.md (Code map)"),
        Layers("python/src", Path("python/src"), code_map(arch, "The Python front"),
               "ARCHITECTURE.md (The Python front)"),
    ]
    found = []
    for layers in crates:
        if not layers.order:
            found.append(f"{layers.map_file}: no `- **`module`**` list found")
            continue
        lib = blank_non_code((layers.source / "lib.rs").read_text(encoding="utf-8"))
        declared = MOD_DECL.findall(lib)
        reexports = {}
        for module, names in ROOT_REEXPORT.findall(lib):
            for name in group_heads(names.strip("{}")) if names.startswith("{") else [names]:
                reexports[name] = module
        found.extend(violations(layers, reexports, declared))
    # Two paths to one module on a line are one problem.
    return crates, list(dict.fromkeys(found))


def main():
    os.chdir(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent)
    crates, found = check()
    for problem in found:
        print(f"layers: {problem}", file=sys.stderr)
    if found:
        print(f"layers: {len(found)} problem(s); a module may use only the modules "
              "listed before it in ARCHITECTURE.md", file=sys.stderr)
        return 1
    for layers in crates:
        print(f"layers: {layers.name}: {' < '.join(layers.order)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
