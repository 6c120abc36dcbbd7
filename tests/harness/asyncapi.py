"""The official AsyncAPI parser (`@asyncapi/parser`, npm), installed on demand, run on a document.

``parse(path)`` returns the parser's diagnostics as dicts (code, message, path, severity:
"error", "warning", "information" or "hint"). Node.js and npm come from the Debian
packages ``nodejs`` and ``npm`` when missing (scripts/test.sh installs them too); the
parser is installed with npm, once, into ``.cache/asyncapi-parser/`` (not committed) and
reused while its version is the pinned one. A machine where that fails fails the test:
it does not skip.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

from tests.harness.servers.base import HarnessError
from tests.harness.servers.process import is_root, run_command

ROOT = Path(__file__).resolve().parents[2]
PARSER_VERSION = "3.6.6"
PARSER_DIR = ROOT / ".cache" / "asyncapi-parser"
SCRIPT = Path(__file__).with_name("asyncapi_validate.mjs")


def _installed_version() -> str | None:
    manifest = PARSER_DIR / "node_modules" / "@asyncapi" / "parser" / "package.json"
    try:
        return str(json.loads(manifest.read_text())["version"])
    except (OSError, ValueError, KeyError):
        return None


def ensure_node() -> None:
    """Install Node.js and npm from Debian packages when either is missing."""
    missing = [package for package, tool in (("nodejs", "node"), ("npm", "npm")) if shutil.which(tool) is None]
    if not missing:
        return
    if shutil.which("apt-get") is None:
        raise HarnessError(f"{' and '.join(missing)} missing and no apt-get here: install Node.js and npm")
    sudo = [] if is_root() else ["sudo", "-n"]
    install = [*sudo, "env", "DEBIAN_FRONTEND=noninteractive", "apt-get", "install", "-y", "-q", *missing]
    if run_command(install, what="apt-get install", timeout=1800, check=False).returncode != 0:
        run_command([*sudo, "apt-get", "update", "-q"], what="apt-get update", timeout=600)
        run_command(install, what="apt-get install", timeout=1800)
    if shutil.which("node") is None or shutil.which("npm") is None:
        raise HarnessError(f"apt-get install {' '.join(missing)} did not provide node and npm")


def ensure_parser() -> Path:
    """The npm prefix holding @asyncapi/parser at the pinned version; install it when needed."""
    if _installed_version() == PARSER_VERSION and shutil.which("node"):
        return PARSER_DIR
    ensure_node()
    PARSER_DIR.mkdir(parents=True, exist_ok=True)
    # Two test processes may get here at once: one installs, the other then finds it installed.
    with open(PARSER_DIR / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _installed_version() != PARSER_VERSION:
            manifest = {"private": True, "description": "test cache (tests/harness/asyncapi.py)", "dependencies": {}}
            (PARSER_DIR / "package.json").write_text(json.dumps(manifest) + "\n")
            run_command(
                [
                    "npm",
                    "install",
                    "--no-audit",
                    "--no-fund",
                    "--save-exact",
                    "--loglevel=error",
                    "--prefix",
                    str(PARSER_DIR),
                    f"@asyncapi/parser@{PARSER_VERSION}",
                ],
                what="npm install @asyncapi/parser",
                timeout=900,
            )
        if _installed_version() != PARSER_VERSION:
            raise HarnessError(f"npm did not install @asyncapi/parser {PARSER_VERSION} into {PARSER_DIR}")
    return PARSER_DIR


def parse(document: Path) -> tuple[str, list[dict[str, Any]]]:
    """Run the official parser on `document`: (parser version, its diagnostics)."""
    parser_dir = ensure_parser()
    result = subprocess.run(
        ["node", str(SCRIPT), str(parser_dir), str(document)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "NODE_NO_WARNINGS": "1"},
    )
    if result.returncode != 0:
        raise HarnessError(f"the AsyncAPI parser failed ({result.returncode}):\n{result.stderr[-4000:]}")
    out = json.loads(result.stdout)
    return str(out["parser"]), list(out["diagnostics"])
