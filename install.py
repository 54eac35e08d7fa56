"""Install the plugin pack into a Megatron-LM checkout's tools/checkpoint/ (or remove it).

    python install.py --megatron-path /path/to/Megatron-LM [--force] [--dry-run]
    python install.py --megatron-path /path/to/Megatron-LM --uninstall

Copies plugins/loader_*.py, plugins/saver_*.py and the library package plugins/ckpt_lib/ next to
upstream's convert.py, never overwriting a file it did not install itself unless --force. What it
installs is recorded (with sha256) in tools/checkpoint/.ckpt_plugins_installed.json, so that
--uninstall removes exactly those files and nothing else.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
MANIFEST = ".ckpt_plugins_installed.json"
LIBRARY = "ckpt_lib"


def fail(message: str, code: int = 2) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def plugin_files(plugins: Path) -> list[Path]:
    """Relative paths of everything the pack consists of."""
    files = sorted(p.relative_to(plugins) for p in plugins.glob("loader_*.py"))
    files += sorted(p.relative_to(plugins) for p in plugins.glob("saver_*.py"))
    files += sorted(p.relative_to(plugins) for p in (plugins / LIBRARY).rglob("*.py") if "__pycache__" not in p.parts)
    return files


def target_dir(megatron: Path) -> Path:
    tools = megatron / "tools" / "checkpoint"
    if not (tools / "convert.py").is_file() or not (megatron / "megatron").is_dir():
        fail(f"--megatron-path {megatron} is not a Megatron-LM checkout (needs tools/checkpoint/convert.py and megatron/)")
    return tools


def read_manifest(tools: Path) -> dict[str, str]:
    path = tools / MANIFEST
    return json.loads(path.read_text())["files"] if path.exists() else {}


def install(plugins: Path, tools: Path, force: bool, dry_run: bool) -> None:
    ours = read_manifest(tools)
    files = plugin_files(plugins)
    if not files:
        fail(f"{plugins}: no plugins found")
    conflicts = [str(f) for f in files if (tools / f).exists() and str(f) not in ours]
    if conflicts and not force:
        fail(f"{tools / conflicts[0]} exists and was not installed by this pack; refusing to overwrite "
             f"({len(conflicts)} conflicting file(s); use --force)")
    record = dict(ours)
    for rel in files:
        dest = tools / rel
        action = "update" if dest.exists() else "add"
        print(f"{action:7s} {dest}")
        if not dry_run:
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(plugins / rel, dest)
            record[str(rel)] = sha256(dest)
    if not dry_run:
        (tools / MANIFEST).write_text(json.dumps({"files": record}, indent=2, sort_keys=True) + "\n")
    print(f"{'would install' if dry_run else 'installed'} {len(files)} files into {tools}")


def remove_empty_dirs(root: Path) -> None:
    """Drop bytecode caches and the directories our removal left empty, deepest first."""
    if not root.is_dir():
        return
    for cache in list(root.rglob("__pycache__")):
        shutil.rmtree(cache)
    for d in sorted((p for p in [root, *root.rglob("*")] if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        if not any(d.iterdir()):
            d.rmdir()


def uninstall(tools: Path, dry_run: bool) -> None:
    ours = read_manifest(tools)
    if not ours:
        fail(f"{tools}: nothing installed by this pack ({MANIFEST} not found)", 1)
    for rel in sorted(ours):
        path = tools / rel
        if path.exists():
            if sha256(path) != ours[rel]:
                print(f"note: {path} was modified after installation; removing it anyway")
            print(f"remove  {path}")
            if not dry_run:
                path.unlink()
    if not dry_run:
        remove_empty_dirs(tools / LIBRARY)
        (tools / MANIFEST).unlink()
    print(f"{'would remove' if dry_run else 'removed'} {len(ours)} files from {tools}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--megatron-path", type=Path, required=True, help="Root of a Megatron-LM checkout")
    parser.add_argument("--plugins-dir", type=Path, default=ROOT / "plugins", help="The pack to install (default: ./plugins)")
    parser.add_argument("--uninstall", action="store_true", help="Remove exactly what a previous install added")
    parser.add_argument("--force", action="store_true", help="Overwrite files this pack did not install")
    parser.add_argument("--dry-run", action="store_true", help="Say what would be done, change nothing")
    args = parser.parse_args()
    tools = target_dir(args.megatron_path.resolve())
    if args.uninstall:
        uninstall(tools, args.dry_run)
    else:
        install(args.plugins_dir.resolve(), tools, args.force, args.dry_run)


if __name__ == "__main__":
    main()
