"""Installing the Debian packages that a test fixture needs (PostgreSQL, Orthanc) with apt-get.

The fixtures install what is missing so that ``make test-all`` runs on a clean machine,
as CI's is; this is the one place that knows how: root and ``apt-get`` only, package lists
fetched (``apt-get update``) only when the first install fails, 15 minutes at most per
apt-get call, and a one-line reason otherwise.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from typing import Callable


def install_packages(packages: list[str], fixture: str, missing: str, error: type[Exception],
                     say: Callable[[str], None]) -> None:
    """``apt-get install`` ``packages`` for ``fixture`` (named in the log lines ``say`` prints).

    Raises ``error`` with ``missing`` (what is not installed and how else to get it) when not
    root or without apt-get, and with apt-get's last lines when it fails."""
    if os.geteuid() != 0:
        raise error(f"{missing}; we are not root to install it (apt-get install {' '.join(packages)})")
    if not shutil.which("apt-get"):
        raise error(f"{missing}; there is no apt-get to install it")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *packages]

    def apt(cmd: list[str]) -> subprocess.CompletedProcess:
        say(f"{fixture} fixture: running `{' '.join(cmd)}`")
        started = time.monotonic()
        try:
            proc = subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=900)
        except subprocess.TimeoutExpired:
            raise error(f"`{' '.join(cmd)}` did not finish in 15 minutes") from None
        say(f"{fixture} fixture: `{' '.join(cmd[:2])}` exited {proc.returncode} after {time.monotonic() - started:.0f} s")
        return proc

    proc = apt(install)
    if proc.returncode != 0:  # a clean image has no package lists yet
        update = apt(["apt-get", "update", "-q"])
        if update.returncode != 0:
            raise error(f"`apt-get update` failed (exit {update.returncode}): {tail(update)}")
        proc = apt(install)
    if proc.returncode != 0:
        raise error(f"`{' '.join(install)}` failed (exit {proc.returncode}): {tail(proc)}")


def tail(proc: subprocess.CompletedProcess, lines: int = 5) -> str:
    """The last ``lines`` lines of a finished command's output, on one line."""
    text = ((proc.stdout or "") + (proc.stderr or "")).strip().splitlines()
    return " | ".join(text[-lines:]) or "(no output)"
