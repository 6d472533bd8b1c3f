"""Is Java 17 there? Standard library only: `make serve` runs this before anything is installed.

    python3 service/java.py   -> exit 0 when Java 17+ is found, else a message saying how to get it
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

JAVA_HELP = """TorchServe needs Java 17 or newer (a JDK or JRE), and `java` was {problem}.
Install it, then run the command again:
  Debian/Ubuntu:  sudo apt-get install -y openjdk-17-jre-headless
  Fedora/RHEL:    sudo dnf install -y java-17-openjdk-headless
  macOS:          brew install openjdk@17
  other:          https://adoptium.net/temurin/releases/?version=17
or set JAVA_HOME to an existing Java 17 installation."""


def java_executable() -> str | None:
    home = os.environ.get("JAVA_HOME")
    if home and Path(home, "bin", "java").exists():
        return str(Path(home, "bin", "java"))
    return shutil.which("java")


def java_problem() -> str | None:
    """None when Java 17 or newer is found; else what is wrong, to fill JAVA_HELP."""
    java = java_executable()
    if not java:
        return "not found on PATH"
    try:
        out = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=30).stderr
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"found at {java} but did not run ({e})"
    m = re.search(r'version "(\d+)(?:\.(\d+))?', out)
    if not m:
        return f"found at {java} but its version could not be read"
    major = int(m.group(1)) if m.group(1) != "1" else int(m.group(2) or 0)  # "1.8" is Java 8
    if major < 17:
        return f"found at {java} but it is Java {major}"
    return None


if __name__ == "__main__":
    problem = java_problem()
    if problem:
        sys.stderr.write(JAVA_HELP.format(problem=problem) + "\n")
        sys.exit(1)
