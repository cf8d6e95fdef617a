"""Link setup.py's ``data_files`` into a prefix, for editable installs.

``pip install -e .`` installs the Python packages and console scripts but never copies
``data_files`` (setuptools' editable wheels leave them out), so the ament index would not list
``moog_ros`` and ``get_package_share_directory('moog_ros')`` would fail. This script reads the
``data_files`` from setup.py itself (the one source of truth) and symlinks every file into
the prefix, so edits to launch/config files show up without reinstalling, like the code does.

Usage: ``python scripts/link_share_files.py --prefix VENV`` (run by scripts/setup_env.sh).
"""

import argparse
import os
from pathlib import Path
import runpy
import sys
from typing import Any
from unittest import mock

REPO = Path(__file__).resolve().parents[1]


def read_setup_kwargs(repo: Path = REPO) -> dict[str, Any]:
    """Run ``repo/setup.py`` with ``setuptools.setup`` intercepted and return its keyword args.

    Args:
        repo: Repository root holding setup.py; the script runs with that as working folder,
            since its globs are relative.

    Returns:
        The keyword arguments setup.py passed to ``setup()``.

    Raises:
        RuntimeError: if setup.py never calls ``setup()``.
    """
    captured: dict[str, Any] = {}

    def fake_setup(**kwargs: Any) -> None:
        captured.update(kwargs)

    old_cwd = os.getcwd()
    try:
        os.chdir(repo)
        with mock.patch('setuptools.setup', fake_setup):
            runpy.run_path(str(repo / 'setup.py'), run_name='__main__')
    finally:
        os.chdir(old_cwd)
    if not captured:
        raise RuntimeError(f'{repo / "setup.py"}: setup() was never called')
    return captured


def data_file_targets(setup_kwargs: dict[str, Any], prefix: Path, repo: Path = REPO
                      ) -> dict[Path, Path]:
    """Map each installed data file path under ``prefix`` to its source file in ``repo``."""
    targets: dict[Path, Path] = {}
    for dst_dir, sources in setup_kwargs['data_files']:
        for src in sources:
            src_path = (repo / src).resolve()
            if not src_path.is_file():
                raise FileNotFoundError(f'setup.py data_files lists {src}, which is not a file')
            targets[prefix / dst_dir / src_path.name] = src_path
    return targets


def link_data_files(prefix: Path, repo: Path = REPO) -> tuple[int, int, int]:
    """Symlink every data file into ``prefix`` and drop stale links into ``repo``.

    Existing regular files at a target (left by a non-editable install) are replaced.

    Returns:
        (number of data files, links created or updated, stale links removed).
    """
    setup_kwargs = read_setup_kwargs(repo)
    targets = data_file_targets(setup_kwargs, prefix, repo)
    changed = 0
    for target, src in targets.items():
        if target.is_symlink() and target.resolve() == src:
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.is_symlink() or target.exists():
            target.unlink()
        target.symlink_to(src)
        changed += 1

    # Links that point into this repo but are no longer in data_files (a renamed launch file,
    # a deleted config) would otherwise keep shadowing the real set.
    removed = 0
    share = prefix / 'share' / setup_kwargs['name']
    if share.is_dir():
        for path in sorted(share.rglob('*')):
            if path.is_symlink() and path not in targets:
                dest = Path(path.parent, path.readlink())
                if dest.resolve().is_relative_to(repo) or not dest.exists():
                    path.unlink()
                    removed += 1
    return len(targets), changed, removed


def main(argv: list[str] | None = None) -> int:
    """CLI entry: link data files into ``--prefix``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--prefix', type=Path, required=True,
                        help='install prefix (the virtual environment folder)')
    parser.add_argument('--repo', type=Path, default=REPO,
                        help='repository root holding setup.py (default: this checkout)')
    args = parser.parse_args(argv)
    prefix = args.prefix.resolve()
    if not (prefix / 'bin' / 'python').exists():
        parser.error(f'{prefix} does not look like a virtual environment (no bin/python)')
    total, changed, removed = link_data_files(prefix, args.repo.resolve())
    print(f'[link_share_files] {total} data files linked into {prefix} '
          f'({changed} updated, {removed} stale removed)', file=sys.stderr)
    return 0


if __name__ == '__main__':
    sys.exit(main())
