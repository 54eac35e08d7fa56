"""The docs stay true to the code (no conversions; a few seconds):

1. docs/options.md has one section per plugin module (plugins/loader_*.py, plugins/saver_*.py) and per
   command-line script (convert.py, verify.py, install.py), and each section's table lists exactly the
   options that plugin's `add_arguments` (or the script's --help) defines; for plugins, the default column
   shows each value default and the row names every allowed choice.
2. docs/modules.md lists exactly the Python modules of the tree: every .py under plugins/ and bench/, the
   root scripts, and tests/ without the test files (test_*.py) and the toy plugins of tests/fixtures_plugins/
   (described by its README); it names no module that does not exist.
3. Every relative link (and its #anchor) in the Markdown files and every repository path written in
   backticks (`plugins/...`, `tests/...`, `bench/...`, `docs/...`, `.ci/...`) resolves.

Each failure says which file, section, option or module to add or remove.
"""

from __future__ import annotations

import argparse
import importlib
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
OPTIONS = DOCS / "options.md"
MODULES = DOCS / "modules.md"
SCRIPTS = ("convert.py", "verify.py", "install.py")
NOT_DOCUMENTED = {"-h", "--help"}


def plugin_modules() -> list[str]:
    plugins = ROOT / "plugins"
    return sorted(p.stem for pattern in ("loader_*.py", "saver_*.py") for p in plugins.glob(pattern))


def plugin_actions(name: str) -> dict[str, argparse.Action]:
    """{option string: action} of a plugin, built as convert.py builds its parser."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False, conflict_handler="resolve")
    importlib.import_module(name).add_arguments(parser)
    return {option: action for action in parser._actions for option in action.option_strings}


OPTION_LINE = re.compile(r"^ {2}(-\S.*)$")  # "  --load-dir LOAD_DIR   help..." in argparse's option list
OPTION = re.compile(r"(?:^|, )(--?[A-Za-z0-9][\w-]*)")


def help_options(text: str) -> set[str]:
    """Option strings in an argparse --help text (aliases included): the invocation column of each
    option line, before the two spaces that start its help."""
    found: set[str] = set()
    for line in text.splitlines():
        match = OPTION_LINE.match(line)
        if match:
            found.update(OPTION.findall(re.split(r" {2,}", match.group(1))[0]))
    return found


def start_scripts() -> dict[str, subprocess.Popen]:
    """`python SCRIPT --help` for each script, started side by side (verify.py imports torch)."""
    return {s: subprocess.Popen([sys.executable, str(ROOT / s), "--help"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, cwd=ROOT) for s in SCRIPTS}


def script_options(runs: dict[str, subprocess.Popen]) -> dict[str, set[str]]:
    """Each script's options from its --help."""
    out = {}
    for script, proc in runs.items():
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0, f"{script} --help failed: {stderr[-2000:]}"
        out[script] = help_options(stdout)
    return out


CELL_SPLIT = re.compile(r"(?<!\\)\|")
HEADING = re.compile(r"^(#+)\s+(.*?)\s*#*\s*$")


def table_rows(lines: list[str]) -> list[list[str]]:
    """Body rows of the Markdown tables in `lines`, as stripped cells (header and separator rows dropped)."""
    rows, previous = [], ""
    for line in lines:
        if line.startswith("|"):
            cells = [c.strip() for c in CELL_SPLIT.split(line.strip().strip("|"))]
            separator = all(re.fullmatch(r":?-{3,}:?", c) for c in cells)
            header = not previous.startswith("|")
            if not separator and not header:
                rows.append(cells)
        previous = line
    return rows


def sections(path: Path) -> dict[str, list[str]]:
    """{first backticked word of a `##` heading: the lines under it up to the next `##` heading}."""
    out: dict[str, list[str]] = {}
    current = None
    for line in path.read_text().splitlines():
        match = HEADING.match(line)
        if match and len(match.group(1)) <= 2:
            key = re.search(r"`([^`]+)`", match.group(2))
            current = key.group(1) if key and len(match.group(1)) == 2 else None
            if current is not None:
                assert current not in out, f"{path.name}: two sections for `{current}`"
                out[current] = []
        elif current is not None:
            out[current].append(line)
    return out


def documented_options(lines: list[str]) -> dict[str, list[str]]:
    """{option string: its row's cells} for the option tables of one section (aliases share a row)."""
    out: dict[str, list[str]] = {}
    for cells in table_rows(lines):
        for option in re.findall(r"`(--?[A-Za-z0-9][\w-]*)`", cells[0]):
            out[option] = cells
    return out


def test_options_page_matches_every_add_arguments():
    runs = start_scripts()  # while this process imports the plugins
    page = sections(OPTIONS)
    problems: list[str] = []
    plugins = plugin_modules()
    for name in plugins:
        importlib.import_module(name)
    scripts = script_options(runs)
    for stale in sorted(set(page) - set(plugins) - set(SCRIPTS)):
        problems.append(f"docs/options.md: remove the section `{stale}` (no such plugin module or script)")
    for name in [*plugins, *SCRIPTS]:
        kind = "plugins/" + name + ".py add_arguments" if name in plugins else name + " --help"
        if name not in page:
            problems.append(f"docs/options.md: add a section '## `{name}`' with a table of its options ({kind})")
            continue
        documented = documented_options(page[name])
        actions = plugin_actions(name) if name in plugins else dict.fromkeys(scripts[name])
        code = set(actions) - NOT_DOCUMENTED
        for option in sorted(code - set(documented)):
            problems.append(f"docs/options.md, section `{name}`: add a row for {option} (defined by {kind})")
        for option in sorted(set(documented) - code):
            problems.append(f"docs/options.md, section `{name}`: remove the row for {option} (not defined by {kind})")
        for option in sorted(code & set(documented)):
            action, row = actions[option], documented[option]
            if action is None:
                continue
            default = action.default
            if default is not None and not isinstance(default, bool) and f"`{default}`" not in row[1]:
                problems.append(f"docs/options.md, section `{name}`, {option}: the default column must show `{default}` "
                                f"(add_arguments' default), it says {row[1]!r}")
            for choice in action.choices or ():
                if f"`{choice}`" not in " | ".join(row):
                    problems.append(f"docs/options.md, section `{name}`, {option}: name the choice `{choice}` in its row")
    assert not problems, "\n".join(problems)


def module_tree() -> set[str]:
    """Repository paths of the modules docs/modules.md must list."""
    found = {p.name for p in ROOT.glob("*.py")}
    for top in ("plugins", "bench", "tests"):
        for p in (ROOT / top).rglob("*.py"):
            rel = p.relative_to(ROOT)
            if "__pycache__" in rel.parts:
                continue
            if top == "tests" and (p.name.startswith("test_") or rel.parts[:2] == ("tests", "fixtures_plugins")):
                continue
            found.add(rel.as_posix())
    return found


def test_module_map_lists_exactly_the_modules():
    text = MODULES.read_text()
    listed: dict[str, int] = {}
    for cells in table_rows(text.splitlines()):
        for path in re.findall(r"`([^`\s]+\.py)`", cells[0]):
            listed[path] = listed.get(path, 0) + 1
    tree = module_tree()
    problems = [f"docs/modules.md: add a row for `{m}` (it exists)" for m in sorted(tree - set(listed))]
    problems += [f"docs/modules.md: remove the row for `{m}` (no such module, or not one the map covers)"
                 for m in sorted(set(listed) - tree)]
    problems += [f"docs/modules.md: `{m}` has {n} rows, keep one" for m, n in sorted(listed.items()) if n > 1]
    mentioned = set(re.findall(r"`([^`\s*<>]+\.py)`", text))
    problems += [f"docs/modules.md: `{m}` does not exist (write module paths from the repository root)"
                 for m in sorted(mentioned - set(listed)) if not (ROOT / m).is_file()]
    assert not problems, "\n".join(problems)


def markdown_files() -> list[Path]:
    return [ROOT / "README.md", *sorted(DOCS.glob("*.md")), *sorted((ROOT / "tests").rglob("*.md"))]


def anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation but `-` and `_` dropped, spaces as `-`, repeats numbered."""
    seen: dict[str, int] = {}
    out = set()
    fenced = False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        match = None if fenced else HEADING.match(line)
        if match:
            slug = re.sub(r"[^\w\- ]", "", match.group(2).lower()).replace(" ", "-")
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            out.add(slug if n == 0 else f"{slug}-{n}")
    return out


LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
REPO_PATH = re.compile(r"`((?:plugins|tests|bench|docs|\.ci)/[^`\s*<>{}]*)`")


def test_links_and_repository_paths_resolve():
    problems = []
    for md in markdown_files():
        where = md.relative_to(ROOT).as_posix()
        text = md.read_text()
        for target in LINK.findall(text):
            if re.match(r"[a-z]+:", target):
                continue  # http(s):, mailto:
            path, _, anchor = target.partition("#")
            resolved = (md.parent / path).resolve() if path else md
            if not resolved.exists():
                problems.append(f"{where}: link ({target}) points to {path}, which does not exist")
            elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
                problems.append(f"{where}: link ({target}): {resolved.relative_to(ROOT)} has no heading #{anchor}")
        for path in REPO_PATH.findall(text):
            if not (ROOT / path).exists():
                problems.append(f"{where}: `{path}` does not exist")
    assert not problems, "\n".join(problems)
