"""Refresh the console's vendored front-end files from the npm registry.

    python -m worker.console.vendor            # fetch the pinned versions
    python -m worker.console.vendor --check    # verify what is on disk, fetch nothing

The console needs no Node toolchain: each package below is pinned, its tarball
fetched from the registry, checked against the registry's SHA-512 integrity, and
only the named files (and the licence) copied into ``static/vendor``. The
versions and the files' SHA-256 are written to ``static/vendor/VERSIONS`` so a
review sees exactly what changed. To upgrade, change a pin and run the command.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

import httpx

REGISTRY = "https://registry.npmjs.org"
VENDOR = Path(__file__).parent / "static" / "vendor"


@dataclass(frozen=True)
class Package:
    """One npm package: its pinned version and the files the console serves from it."""

    name: str
    version: str
    #: tarball path -> file name under static/vendor
    files: dict[str, str]


PACKAGES = (
    Package(
        "htmx.org",
        "2.0.11",
        {"package/dist/htmx.min.js": "htmx.min.js", "package/LICENSE": "htmx.LICENSE"},
    ),
    Package(
        "uplot",
        "1.6.32",
        {
            "package/dist/uPlot.iife.min.js": "uPlot.iife.min.js",
            "package/dist/uPlot.min.css": "uPlot.min.css",
            "package/LICENSE": "uPlot.LICENSE",
        },
    ),
)


def _fetch(client: httpx.Client, package: Package) -> dict[str, bytes]:
    meta = client.get(f"{REGISTRY}/{package.name}/{package.version}").raise_for_status().json()
    tarball = client.get(meta["dist"]["tarball"]).raise_for_status().content
    algorithm, _, expected = meta["dist"]["integrity"].partition("-")
    if algorithm != "sha512":
        raise SystemExit(f"{package.name}: unexpected integrity {algorithm}")
    if base64.b64encode(hashlib.sha512(tarball).digest()).decode() != expected:
        raise SystemExit(f"{package.name}@{package.version}: tarball fails its integrity check")
    out: dict[str, bytes] = {}
    with tarfile.open(fileobj=io.BytesIO(tarball), mode="r:gz") as archive:
        for member, target in package.files.items():
            extracted = archive.extractfile(member)
            if extracted is None:
                raise SystemExit(f"{package.name}: no {member} in the tarball")
            out[target] = extracted.read()
    return out


def _versions_text() -> str:
    lines = ["# Written by `python -m worker.console.vendor`: package@version, file, sha256"]
    for package in PACKAGES:
        for target in package.files.values():
            digest = hashlib.sha256((VENDOR / target).read_bytes()).hexdigest()
            lines.append(f"{package.name}@{package.version} {target} {digest}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Fetch (or with ``--check`` verify) the vendored files."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="verify the files on disk")
    args = parser.parse_args(argv)
    versions = VENDOR / "VERSIONS"
    if args.check:
        ok = versions.read_text() == _versions_text()
        sys.stdout.write(f"vendored files {'match' if ok else 'differ from'} VERSIONS\n")
        return 0 if ok else 1
    VENDOR.mkdir(parents=True, exist_ok=True)
    with httpx.Client(timeout=60, follow_redirects=True) as client:
        for package in PACKAGES:
            for target, content in _fetch(client, package).items():
                (VENDOR / target).write_bytes(content)
            sys.stdout.write(
                f"{package.name}@{package.version}: {', '.join(package.files.values())}\n"
            )
    versions.write_text(_versions_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
