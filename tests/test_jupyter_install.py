"""The README's Jupyter command, for real: ``bash scripts/jupyter.sh --no-browser --port N``.

Run against the repository's ``.venv`` as ``scripts/test.sh`` left it (the ``[dev]`` extra):
jupyter.sh must only top up the ``[jupyter]`` extra — with pip's index switched off
(``PIP_NO_INDEX=1``), so nothing is downloaded — then start JupyterLab and print its URL with
a token. Through the server's REST API and kernel websocket (with that token) a kernel is
started and runs ``import cryosiam_nb``; the kernel and the server are shut down and no
process is left behind.

Skipped only when the install cannot be done without the network: ``.venv`` missing or out of
date (jupyter.sh would rebuild it), or a missing ``[jupyter]`` requirement that pip cannot
install from local files.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

import cryosiam_nb

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / ".venv"

pytestmark = pytest.mark.slow

#: exit 0 when every requirement of the [jupyter] extra is installed in .venv at its pin
_EXTRA_OK = """
import sys, tomllib
from importlib.metadata import PackageNotFoundError, version
from packaging.requirements import Requirement
extra = tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["jupyter"]
missing = []
for req in map(Requirement, extra):
    try:
        if not req.specifier.contains(version(req.name), prereleases=True):
            missing.append(str(req))
    except PackageNotFoundError:
        missing.append(str(req))
print(" ".join(missing))
sys.exit(1 if missing else 0)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped) is gone too
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _wait_gone(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while _alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def _api(url: str, token: str, path: str, method: str = "GET", body: dict | None = None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(
        url + path,
        method=method,
        data=data,
        headers={"Authorization": f"token {token}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        raw = r.read()
        return r.status, json.loads(raw) if raw else None


def _execute(url: str, token: str, kernel_id: str, code: str, timeout: float = 180) -> str:
    """Run ``code`` in the kernel over its websocket channel; its stdout (errors raise)."""
    import websocket  # websocket-client: a jupyter_server dependency

    ws = websocket.create_connection(
        url.replace("http", "ws", 1) + f"/api/kernels/{kernel_id}/channels",
        header=[f"Authorization: token {token}"],
        timeout=timeout,
    )
    msg_id = uuid.uuid4().hex
    header = {"msg_id": msg_id, "username": "test", "session": uuid.uuid4().hex}
    content = {"code": code, "silent": False, "store_history": False, "user_expressions": {}}
    ws.send(
        json.dumps(
            {
                "header": {**header, "msg_type": "execute_request", "version": "5.3"},
                "parent_header": {},
                "metadata": {},
                "content": {**content, "allow_stdin": False, "stop_on_error": True},
                "channel": "shell",
                "buffers": [],
            }
        )
    )
    out, status, idle = [], None, False
    deadline = time.monotonic() + timeout
    try:
        while not (status and idle):
            assert time.monotonic() < deadline, f"no reply in {timeout} s; output so far: {out}"
            msg = json.loads(ws.recv())
            if msg.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            kind, c = msg["msg_type"], msg["content"]
            if kind == "stream":
                out.append(c["text"])
            elif kind == "error":
                raise AssertionError(f"{c['ename']}: {c['evalue']}")
            elif kind == "execute_reply":
                status = c["status"]
            elif kind == "status" and c["execution_state"] == "idle":
                idle = True
    finally:
        ws.close()
    assert status == "ok", (status, out)
    return "".join(out)


def _missing_extra() -> str:
    """Skip unless jupyter.sh can run network-free on .venv; the [jupyter] requirements
    missing there ('' when none: then jupyter.sh must not run pip at all)."""
    python = VENV / "bin" / "python"
    stamp = VENV / ".cryosiam_nb-installed"
    want = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()[:16]
    if not python.exists() or not stamp.exists() or stamp.read_text().strip() != want:
        pytest.skip(".venv is missing or older than pyproject.toml: jupyter.sh would rebuild it")
    check = subprocess.run(
        [str(python), "-I", "-c", _EXTRA_OK], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    return check.stdout.strip() or ("?" if check.returncode else "")


def _env(tmp_path: Path) -> dict[str, str]:
    """jupyter.sh's environment: pip without an index, Jupyter's folders in ``tmp_path``."""
    env = {
        **os.environ,
        "PIP_NO_INDEX": "1",  # network-free: pip may use local files only
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"),
        "JUPYTER_CONFIG_DIR": str(tmp_path / "config"),
        "JUPYTER_DATA_DIR": str(tmp_path / "data"),
        "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"),
        "JUPYTERLAB_SETTINGS_DIR": str(tmp_path / "user_settings"),
        "JUPYTERLAB_WORKSPACES_DIR": str(tmp_path / "workspaces"),
    }
    env.pop("VIRTUAL_ENV", None)
    return env


def test_jupyter_sh_starts_lab_with_a_kernel_that_imports_cryosiam_nb(tmp_path):
    missing = _missing_extra()
    extra_installed = not missing
    port = _free_port()
    env = _env(tmp_path)
    cmd = ["bash", str(ROOT / "scripts" / "jupyter.sh"), "--no-browser", f"--port={port}"]
    cmd += ["--ServerApp.port_retries=0", "--ServerApp.ip=127.0.0.1"]
    log_path = tmp_path / "jupyter.log"
    log = open(log_path, "w")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(
        cmd, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    url, token, kernel_pid = f"http://127.0.0.1:{port}", None, None
    try:
        # the URL with the token jupyter.sh prints, then the server answering
        deadline = time.monotonic() + 240
        while True:
            text = log_path.read_text()
            if proc.poll() is not None:
                if not extra_installed and "pip install failed" in text:
                    pytest.skip(f"the [jupyter] extra ({missing}) cannot be "
                                f"installed without the network:\n{text[-1500:]}")  # fmt: skip
                raise AssertionError(f"jupyter.sh exited with {proc.returncode}:\n{text[-3000:]}")
            m = re.search(rf"http://(?:127\.0\.0\.1|localhost):{port}/lab\?token=([0-9a-f]+)", text)
            if m:
                token = m.group(1)
                try:
                    if _api(url, token, "/api/status")[0] == 200:
                        break
                except OSError:
                    pass
            assert time.monotonic() < deadline, f"JupyterLab did not answer in 240 s:\n{text}"
            time.sleep(0.5)
        if extra_installed:  # a top-up of what is there runs no pip
            assert "installing the [jupyter] extra" not in text, text

        # JupyterLab itself, and a token is required
        with urllib.request.urlopen(f"{url}/lab?token={token}", timeout=30) as r:
            assert r.status == 200 and "jupyter-config-data" in r.read().decode()
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"{url}/api/kernels", timeout=10)
        assert err.value.code == 403

        # a kernel, started through the server, imports this checkout's cryosiam_nb
        _, specs = _api(url, token, "/api/kernelspecs")
        assert specs["kernelspecs"], specs
        _, kernel = _api(url, token, "/api/kernels", "POST", {"name": specs["default"]})
        code = "import os, sys, cryosiam_nb\nprint(cryosiam_nb.__version__, os.getpid(), sys.executable)"
        out = _execute(url, token, kernel["id"], code).split()
        assert out[0] == cryosiam_nb.__version__, out
        kernel_pid = int(out[1])
        assert Path(out[2]).parent.resolve() == (VENV / "bin").resolve(), out  # .venv's python
        assert _api(url, token, f"/api/kernels/{kernel['id']}", "DELETE")[0] == 204
        assert _wait_gone(kernel_pid, 30), "the kernel process outlived its shutdown"

        # the server shuts down on request
        assert _api(url, token, "/api/shutdown", "POST")[0] in (200, 202, 204)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if kernel_pid is not None and _alive(kernel_pid):
            os.kill(kernel_pid, signal.SIGKILL)
        log.close()
    # nothing left of the server's process group (jupyter.sh execs JupyterLab in it)
    try:
        os.killpg(proc.pid, 0)
        leftover = True
    except ProcessLookupError:
        leftover = False
    assert not leftover, (
        f"processes of jupyter.sh are still running:\n{log_path.read_text()[-2000:]}"
    )


def test_register_kernel_adds_a_cryosiam_nb_kernel_of_the_venv(tmp_path):
    """``jupyter.sh --register-kernel`` (JupyterHub): a user kernelspec "cryosiam_nb" that
    runs ``.venv``'s python and that ``jupyter kernelspec list`` shows."""
    missing = _missing_extra()
    env = _env(tmp_path)  # the user kernel folder is JUPYTER_DATA_DIR/kernels
    run = subprocess.run(
        ["bash", str(ROOT / "scripts" / "jupyter.sh"), "--register-kernel"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    if run.returncode and missing and "pip install failed" in run.stderr:
        pytest.skip(f"the [jupyter] extra ({missing}) cannot be installed without the network")
    assert run.returncode == 0, run.stdout + run.stderr
    spec = json.loads((tmp_path / "data" / "kernels" / "cryosiam_nb" / "kernel.json").read_text())
    assert spec["display_name"] == "Python (cryosiam_nb)"
    assert Path(spec["argv"][0]).parent.resolve() == (VENV / "bin").resolve(), spec["argv"]
    listed = subprocess.run(
        [str(VENV / "bin" / "jupyter"), "kernelspec", "list", "--json"],
        env=env, capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    assert "cryosiam_nb" in json.loads(listed.stdout)["kernelspecs"]
