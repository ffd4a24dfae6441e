"""What this build is, for `--version` and `whatsapp_exporter_build_info`."""

from __future__ import annotations

import os
import platform
import subprocess
from dataclasses import dataclass
from pathlib import Path

from exporter import __version__


@dataclass(frozen=True)
class Build:
    version: str
    revision: str
    python: str

    def labels(self) -> dict[str, str]:
        return {"revision": self.revision, "pythonversion": self.python}

    def __str__(self) -> str:
        return (
            f"whatsapp-exporter, version {self.version} (revision: {self.revision})\n"
            f"  python: {self.python} ({platform.python_implementation()})"
        )


def current() -> Build:
    return Build(__version__, revision(), platform.python_version())


def revision() -> str:
    """The image's build argument (the Dockerfile sets it), else the git checkout the package
    runs from, else "unknown"."""
    given = os.environ.get("WHATSAPP_EXPORTER_REVISION", "").strip()
    if given:
        return given
    root = Path(__file__).resolve().parent.parent
    if (root / ".git").exists():
        try:
            found = subprocess.run(
                ["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"],
                capture_output=True,
                text=True,
                timeout=2,
                check=False,
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            found = ""
        if found:
            return found
    return "unknown"
