"""The host's pip configuration, for a container build that must reach the same registries.

`pip config list` already merges every config file and PIP_* variable the way pip
reads them; this flattens that into one pip.conf (mounted at /etc/pip.conf in the
build) and prints the bind mounts for the local paths it names (wheel directories,
file:// indexes, constraint files, the CA bundle's directory). Nothing of it is
left in the image: build-time mounts are not committed.

    python3 docker/host_pip.py OUT_DIR [--drop KEY ...]   # prints one -v argument per line
"""

from __future__ import annotations

import argparse
import ast
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

# Not meaningful in a fresh container, or handled by the Dockerfiles themselves.
SKIPPED = {"disable-pip-version-check", "no-cache-dir", "root-user-action", "user", "target", "prefix"}
CONTAINER_CONF = "/etc/pip.conf"


def merged_config(python: str) -> dict[tuple[str, str], str]:
    """(section, key) -> value, later sources (PIP_* variables) over earlier ones (files)."""
    out = subprocess.run([python, "-m", "pip", "config", "list"], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    merged: dict[tuple[str, str], str] = {}
    env: dict[tuple[str, str], str] = {}
    for line in out.splitlines():
        name, _, raw = line.partition("=")
        section, _, key = name.rpartition(".")
        value = ast.literal_eval(raw)
        if section == ":env:":
            env[("global", key)] = value
        else:
            merged[(section, key)] = value
    return merged | env


def local_paths(value: str) -> list[Path]:
    """The existing local paths a config value names; a PEP 503 `.../simple` index brings its parent."""
    paths = []
    for token in value.split():
        path = Path(urlparse(token).path) if token.startswith("file://") else Path(token)
        if not path.is_absolute() or not path.exists():
            continue
        paths.append(path.parent if path.name == "simple" else path)
    return paths


def mounts_for(config: dict[tuple[str, str], str]) -> list[str]:
    paths: set[Path] = set()
    for (_, key), value in config.items():
        found = local_paths(value)
        paths |= {p.parent if key == "cert" else p for p in found}  # a bundle's dir: certs link within it
    ordered = sorted(paths, key=lambda p: (len(p.parts), str(p)))
    kept = [p for p in ordered if not any(q != p and q in p.parents for q in ordered)]
    return [f"{p}:{p}:ro" for p in kept]


def write_conf(config: dict[tuple[str, str], str], path: Path) -> None:
    sections: dict[str, list[str]] = {}
    for (section, key), value in sorted(config.items()):
        sections.setdefault(section, []).append(f"{key} = {value}")
    path.write_text("".join(f"[{s}]\n" + "\n".join(lines) + "\n" for s, lines in sections.items()))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--drop", action="append", default=[], help="a pip option to leave out (e.g. find-links)")
    parser.add_argument("--python", default=sys.executable)
    args = parser.parse_args()
    config = {k: v for k, v in merged_config(args.python).items() if k[1] not in SKIPPED | set(args.drop)}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    conf = args.out_dir / "pip.conf"
    write_conf(config, conf)
    print(f"{conf}:{CONTAINER_CONF}:ro")
    print("\n".join(mounts_for(config)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
