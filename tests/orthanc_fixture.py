"""A real Orthanc PACS with its DICOMweb plugin for tests: the session fixture ``orthanc``.

``CXRGAZE_TEST_ORTHANC_URL`` (``http://HOST:PORT``, Orthanc's REST root, with DICOMweb at
``/dicom-web``, no authentication) names a server to use as it is. Otherwise a throwaway
server is made and started:

1. ``Orthanc`` is looked up on ``PATH`` and the DICOMweb plugin (``libOrthancDicomWeb.so``)
   in the files of Debian's ``orthanc-dicomweb`` package (``dpkg -L``), then under
   ``/usr/share/orthanc/plugins`` and ``/usr/lib/orthanc``.
2. Missing, and running as root with ``apt-get``: Debian's ``orthanc`` and
   ``orthanc-dicomweb`` packages are installed (``DEBIAN_FRONTEND=noninteractive apt-get
   install -y --no-install-recommends orthanc orthanc-dicomweb``, after ``apt-get update``
   when the package lists lack them), saying so on the terminal. Where that is impossible
   (not root, no apt-get, the install fails) the tests that need the server are skipped,
   with the reason. The package's own service is not used (nor started by the fixture).
3. A JSON configuration in a temporary folder: HTTP on a free loopback port, the DICOM
   (C-STORE) server off, storage and index in the same folder, no remote access, no
   authentication, the DICOMweb plugin at ``/dicom-web/``. ``Orthanc CONFIG`` is started
   and waited for (``GET /system``).
4. At the end of the session the server is stopped (SIGTERM; killed if that fails) and
   the folder deleted, also when tests failed or setup broke half-way.

Use: ``from orthanc_fixture import orthanc  # noqa: F401`` in a test module.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest
import requests

from apt import install_packages
from conftest import free_port
from postgres_fixture import _sayer

ENV_URL = "CXRGAZE_TEST_ORTHANC_URL"
PACKAGES = ("orthanc", "orthanc-dicomweb")
PLUGIN = "libOrthancDicomWeb.so"


class OrthancUnavailable(RuntimeError):
    """No Orthanc with DICOMweb can be started here (the reason is the message)."""


@dataclass
class Orthanc:
    """An Orthanc server: ``url`` (REST root) and ``dicomweb`` (its DICOMweb root)."""

    url: str
    owned: bool

    @property
    def dicomweb(self) -> str:
        return f"{self.url}/dicom-web"

    def upload(self, data: bytes) -> dict:
        """Store one DICOM file through the REST API (``POST /instances``)."""
        answer = requests.post(f"{self.url}/instances", data=data, timeout=30)
        answer.raise_for_status()
        return answer.json()

    def instances_of(self, study_uid: str) -> list[str]:
        """Orthanc ids of the instances of the study ``study_uid`` (none when it is unknown)."""
        answer = requests.post(f"{self.url}/tools/find", json={"Level": "Instance", "Query": {
            "StudyInstanceUID": study_uid}}, timeout=30)
        answer.raise_for_status()
        return answer.json()

    def file(self, orthanc_id: str) -> bytes:
        """The stored DICOM file of an instance (``GET /instances/ID/file``)."""
        answer = requests.get(f"{self.url}/instances/{orthanc_id}/file", timeout=30)
        answer.raise_for_status()
        return answer.content


def find_orthanc() -> tuple[Path, Path] | None:
    """(the ``Orthanc`` executable, the DICOMweb plugin), or None when either is missing."""
    binary = shutil.which("Orthanc") or ("/usr/sbin/Orthanc" if os.access("/usr/sbin/Orthanc", os.X_OK) else None)
    if binary is None:
        return None
    candidates: list[str] = []
    if shutil.which("dpkg"):
        proc = subprocess.run(["dpkg", "-L", "orthanc-dicomweb"], capture_output=True, text=True)
        if proc.returncode == 0:
            candidates += [line for line in proc.stdout.splitlines() if Path(line).name.startswith(PLUGIN)]
    candidates += glob.glob(f"/usr/share/orthanc/plugins/{PLUGIN}*") + glob.glob(f"/usr/lib/orthanc/{PLUGIN}*")
    plugins = sorted((c for c in candidates if os.path.isfile(c)), key=lambda c: (Path(c).name != PLUGIN, c))
    return (Path(binary), Path(plugins[0])) if plugins else None


def install_orthanc(say) -> None:
    """Install Debian's ``orthanc`` and ``orthanc-dicomweb`` (root + apt-get only); raises :class:`OrthancUnavailable`."""
    install_packages(list(PACKAGES), "orthanc", f"Orthanc with its DICOMweb plugin is not installed and {ENV_URL} is "
                     "not set", OrthancUnavailable, say)


class Server:
    """A throwaway Orthanc in a temporary folder (see the module doc)."""

    def __init__(self, binary: Path, plugin: Path, say) -> None:
        self.binary, self.plugin, self.say = binary, plugin, say
        self.root = Path(tempfile.mkdtemp(prefix="cxrgaze-orthanc-"))
        self.log = self.root / "orthanc.log"
        self.process: subprocess.Popen | None = None

    def config(self, port: int) -> Path:
        storage = self.root / "storage"
        config = {
            "Name": "cxrgaze-test", "HttpPort": port, "HttpServerEnabled": True, "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False, "SslEnabled": False, "DicomServerEnabled": False,
            "DicomPort": free_port(), "StorageDirectory": str(storage), "IndexDirectory": str(storage),
            "StorageCompression": False, "Plugins": [str(self.plugin)],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False, "Ssl": False},
        }
        path = self.root / "orthanc.json"
        path.write_text(json.dumps(config, indent=2))
        return path

    def start(self, timeout: float = 60) -> str:
        started = time.monotonic()
        for attempt in range(3):  # the free port may be taken in between
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            with open(self.log, "ab") as log:
                self.process = subprocess.Popen([str(self.binary), str(self.config(port))], cwd=self.root,
                                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
            while time.monotonic() - started < timeout * (attempt + 1) and self.process.poll() is None:
                try:
                    if requests.get(f"{url}/system", timeout=2).ok and \
                            requests.get(f"{url}/dicom-web/studies", timeout=5).ok:
                        version = requests.get(f"{url}/system", timeout=2).json().get("Version")
                        self.say(f"orthanc fixture: Orthanc {version} with {self.plugin.name} started on {url} in "
                                 f"{time.monotonic() - started:.1f} s (storage {self.root})")
                        return url
                except requests.RequestException:
                    pass
                time.sleep(0.2)
            self.stop_process()
            log = self.log.read_text(errors="replace") if self.log.exists() else ""
            if "bind" not in log.lower() or attempt == 2:
                raise OrthancUnavailable(f"Orthanc did not start (exit {self.process.returncode}): "
                                         f"{' | '.join(log.strip().splitlines()[-5:])}")
        raise OrthancUnavailable("Orthanc did not start")

    def stop_process(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)

    def stop(self) -> None:
        try:
            self.stop_process()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="session")
def orthanc(request) -> Iterator[Orthanc]:
    """An Orthanc with DICOMweb for the session (see the module doc); skips, with the reason, where none can run."""
    given = os.environ.get(ENV_URL)
    if given:
        yield Orthanc(given.rstrip("/"), owned=False)
        return
    say = _sayer(request.config)
    try:
        found = find_orthanc()
        if found is None:
            install_orthanc(say)
            found = find_orthanc()
            if found is None:
                raise OrthancUnavailable(f"apt-get installed {' '.join(PACKAGES)} but no Orthanc executable or "
                                         f"{PLUGIN} was found")
    except OrthancUnavailable as exc:
        say(f"orthanc fixture: skipping: {exc}")
        pytest.skip(str(exc))
    server = Server(*found, say)
    try:
        try:
            url = server.start()
        except (OrthancUnavailable, OSError) as exc:
            say(f"orthanc fixture: skipping: {exc}")
            pytest.skip(f"Orthanc could not start: {exc}")
        yield Orthanc(url, owned=True)
    finally:
        server.stop()
