"""The Deployment Engine on 127.0.0.1: TLS, SuperNode authentication, a real run.

These tests start real `flower-superlink` / `flower-supernode` processes (each in its
own session, always killed at the end) with credentials from `fed-asr-credentials`.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "deploy_local.sh"
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _env(flwr_home: Path) -> dict[str, str]:
    return {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "FLWR_HOME": str(flwr_home),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    }


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen]]:
    """Processes started by a test, each in its own session; killed afterwards."""
    started: list[subprocess.Popen] = []
    yield started
    for proc in started:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def test_loopback_deployment_tls_node_auth_end_to_end(
    tmp_path: Path, run_overrides
) -> None:  # type: ignore[no-untyped-def]
    # Prepare: one stage of the tiny slice, the tests' shared base-model cache
    small = [
        o
        for o in run_overrides("unused", **{"data.stage_order": "[shape]"})
        if not o.startswith(("output_dir=", "federation.num_clients="))
    ]
    env = {
        **_env(tmp_path / "unused-home"),
        "FED_ASR_OVERRIDES": " ".join(small),
        "FED_ASR_NODES": "3",
        # node 0 through its site worker, node 1 by its site executor (process
        # isolation mode), node 2 in a ClientApp process per message
        "FED_ASR_SITE_WORKERS": "1",
        "FED_ASR_SITE_EXECUTORS": "1",
    }
    # Execute
    result = subprocess.run(
        ["bash", str(SCRIPT), str(tmp_path / "deploy")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    # Assert: the script succeeded, printed the metrics path last, stopped everything
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    path = Path(result.stdout.strip().splitlines()[-1])
    assert path == tmp_path / "deploy" / "run" / "metrics.json"
    metrics = json.loads(path.read_text())
    assert metrics["stages"] == ["shape"]
    assert metrics["accuracy_matrix"][0][0] is not None
    assert set(metrics["per_client"]) == {"0", "1", "2"}
    assert metrics["security"]["secure_spectrum"] and metrics["security"]["signed"]
    assert metrics["failed_replies"] == 0 and metrics["dropped_replies"] == 0
    (round_,) = metrics["rounds"]
    assert round_["clients_answered"] == 3
    assert round_["bytes_up_adapter"] > 0 and round_["bytes_up_spectrum"] > 0
    assert "--enable-supernode-auth" in SCRIPT.read_text()
    # Node 0's messages were all handled by its worker (model loaded once), node 1's
    # by its executor's one process, node 2's each in their own ClientApp process;
    # all three took part in every step above
    out = tmp_path / "deploy"
    worker_lines = _timing_lines(out / "supernode-0.log")
    assert worker_lines and all(line.endswith("(site worker)") for line in worker_lines)
    handled = (out / "site-worker-0.log").read_text().count(" handled in ")
    assert handled == len(worker_lines)
    executor_log = (out / "site-executor-1.log").read_text()
    assert executor_log.count(" done in ") == len(worker_lines)
    assert "failed in" not in executor_log
    assert _timing_lines(out / "supernode-1.log") == []  # no ClientApp processes
    plain = _timing_lines(out / "supernode-2.log")
    assert len(plain) == len(worker_lines)
    assert all(line.endswith("(in-process)") for line in plain)
    deadline = time.monotonic() + 15  # killed processes may take a moment to go
    while True:
        left = subprocess.run(
            ["pgrep", "-af", str(tmp_path / "deploy")], capture_output=True, text=True
        ).stdout.strip()
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert left == "", f"processes left running: {left}"


def _timing_lines(log: Path) -> list[str]:
    """The ClientApp's per-message timing lines in a SuperNode log."""
    return [
        line.strip() for line in log.read_text().splitlines() if "] timing " in line
    ]


def test_unregistered_or_untrusting_supernode_is_refused(
    tmp_path: Path, processes: list[subprocess.Popen]
) -> None:
    # Prepare: credentials for 2 nodes; a SuperLink with TLS and node authentication
    certs, home = tmp_path / "certs", tmp_path / "home"
    home.mkdir()
    env = _env(home)
    subprocess.run(
        [BIN / "fed-asr-credentials", "--out", certs, "--nodes", "2"],
        check=True,
        capture_output=True,
        env=env,
    )
    other_ca = tmp_path / "other"
    subprocess.run(
        [BIN / "fed-asr-credentials", "--out", other_ca, "--nodes", "1"],
        check=True,
        capture_output=True,
        env=env,
    )
    port = _free_port()
    link = subprocess.Popen(
        [BIN / "flower-superlink", "--ssl-ca-certfile", certs / "ca.crt",
         "--ssl-certfile", certs / "server.pem", "--ssl-keyfile", certs / "server.key",
         "--enable-supernode-auth", "--host", "127.0.0.1", "--port", str(port),
         "--database", tmp_path / "link.db"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    processes.append(link)
    (home / "config.toml").write_text(
        '[superlink]\ndefault = "t"\n\n[superlink.t]\n'
        f'address = "127.0.0.1:{port}"\nroot-certificates = "{certs / "ca.crt"}"\n'
    )
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), 1).close()
            break
        except OSError:
            assert time.monotonic() < deadline, "SuperLink did not start"
            time.sleep(0.3)
    registered = subprocess.run(
        [BIN / "flwr", "supernode", "register", certs / "node-0.pub", "t"],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert registered.returncode == 0, registered.stdout + registered.stderr

    def supernode(key: Path, ca: Path, name: str) -> tuple[int | None, str]:
        """Start a SuperNode; return (exit code or None if still up, its log)."""
        log = tmp_path / f"{name}.log"
        with log.open("w") as out:
            proc = subprocess.Popen(
                [BIN / "flower-supernode", "--root-certificates", ca,
                 "--auth-supernode-private-key", key,
                 "--superlink", f"127.0.0.1:{port}", "--port", str(_free_port()),
                 "--max-retries", "2", "--max-wait-time", "15"],
                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        processes.append(proc)
        try:
            code: int | None = proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            code = None
        return code, log.read_text()

    # Execute: node-1's key was never registered; node-0 does not trust the server's CA
    unregistered = supernode(certs / "node-1", certs / "ca.crt", "unregistered")
    untrusting = supernode(certs / "node-0", other_ca / "ca.crt", "untrusting")
    listed = subprocess.run(
        [BIN / "flwr", "supernode", "list", "t"],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    # Assert: both exit with an error; the SuperLink lists only the registered node,
    # which never came online
    assert unregistered[0] not in (None, 0), unregistered[1][-2000:]
    assert "Failed to activate SuperNode" in unregistered[1]
    assert untrusting[0] not in (None, 0), untrusting[1][-2000:]
    assert listed.stdout.count(" registered ") == 1
    assert " online " not in listed.stdout
