"""Start JupyterLab for a browser test, and find the browser that drives it.

The server runs from this project's environment (the Python running the tests) on 127.0.0.1,
on a free port, with a random token, serving a scratch copy of the notebooks (JupyterLab
autosaves, and committed notebooks carry no outputs). Its settings, workspaces and runtime
files live in the scratch folder too, so nothing a person has configured leaks into the test.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from course_utils.launch import free_port

# JupyterLab settings for a quiet, fully rendered page: no news/update toasts over the widgets,
# and every cell kept in the DOM (windowed notebooks drop cells scrolled out of view).
SETTINGS = {
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {
        "fetchNews": "false",
        "checkForUpdates": False,
    },
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {
        "windowingMode": "none",
        "autoStartDefaultKernel": True,  # no "Select Kernel" dialog
    },
}


def find_chromium() -> str | None:
    """The path of a Chromium executable on PATH (Debian's `chromium` package), or None."""
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _die_with_parent() -> None:
    """In the child, before exec: ask Linux to send SIGTERM when the parent dies."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class Lab:
    """A running JupyterLab server: its process, address, token and log file."""

    process: subprocess.Popen
    port: int
    token: str
    root: Path  # the folder it serves
    log: Path

    def url(self, path: str = "lab", query: str = "") -> str:
        """The URL of ``path`` on this server, token included (``query``: more parameters)."""
        return (
            f"http://127.0.0.1:{self.port}/{path}?{query + '&' if query else ''}token={self.token}"
        )

    def log_tail(self, chars: int = 4000) -> str:
        """The end of the server's log, for a failure message."""
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""


def start_lab(root: Path, scratch: Path, env: dict[str, str], timeout: float = 60) -> Lab:
    """Start ``jupyter lab`` serving ``root`` with ``env``; return once it answers its API."""
    for name, values in SETTINGS.items():
        path = scratch / "settings" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))
    port, token = free_port(), secrets.token_hex(16)
    env = {
        **env,
        "JUPYTER_CONFIG_DIR": str(scratch / "config"),
        "JUPYTER_RUNTIME_DIR": str(scratch / "runtime"),
        "JUPYTER_DATA_DIR": str(scratch / "data"),
    }
    log = scratch / "jupyterlab.log"
    command = [
        sys.executable,
        "-m",
        "jupyterlab",
        "--no-browser",
        "--ip=127.0.0.1",
        f"--port={port}",
        "--ServerApp.port_retries=0",  # the port we chose, or fail
        f"--IdentityProvider.token={token}",
        f"--ServerApp.root_dir={root}",
        f"--LabApp.user_settings_dir={scratch / 'settings'}",
        f"--LabApp.workspaces_dir={scratch / 'workspaces'}",
        "--allow-root",  # CI containers run as root; harmless otherwise
    ]
    with open(log, "w") as log_file:
        # A session of its own (stop_lab signals its group), ended with the test if the test
        # process is killed outright, so that no server or kernel outlives a crashed run.
        process = subprocess.Popen(
            command,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
    lab = Lab(process, port, token, root, log)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"JupyterLab exited with {process.returncode}:\n{lab.log_tail()}")
        try:
            with urllib.request.urlopen(lab.url("api/status"), timeout=2) as response:
                if response.status == 200:
                    return lab
        except (urllib.error.URLError, OSError):
            time.sleep(0.3)
    stop_lab(lab)
    raise RuntimeError(f"JupyterLab did not answer within {timeout} s:\n{lab.log_tail()}")


def _api(lab: Lab, path: str, method: str = "GET"):
    """Call the server's REST API; return the decoded JSON answer (None if empty)."""
    request = urllib.request.Request(lab.url(path), method=method)
    with urllib.request.urlopen(request, timeout=10) as response:
        body = response.read()
    return json.loads(body) if body else None


def shutdown_kernels(lab: Lab) -> None:
    """Shut down every kernel the server runs (a busy one would slow the next test down)."""
    try:
        for kernel in _api(lab, "api/kernels"):
            _api(lab, f"api/kernels/{kernel['id']}", method="DELETE")
    except (urllib.error.URLError, OSError):
        pass  # the server is gone, or going: its own shutdown stops its kernels


def stop_lab(lab: Lab, timeout: float = 15) -> None:
    """Shut down the server's kernels (each runs in a session of its own), then the server."""
    if lab.process.poll() is not None:
        return
    shutdown_kernels(lab)
    try:
        os.killpg(lab.process.pid, signal.SIGTERM)  # the server shuts its kernels down
        lab.process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(lab.process.pid, signal.SIGKILL)
        lab.process.wait(timeout=timeout)
    except ProcessLookupError:
        pass
