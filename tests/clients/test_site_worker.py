"""The site worker: a long-lived process that handles the ClientApp's messages.

The worker runs for real (a thread serving a Unix socket, or the
``fed-asr-site-worker`` command in its own process); messages go through Flower's
protobuf encodings both ways, as from a ``flwr-clientapp`` process.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from flower_helpers import first_site, message, node_context, set_task_identity
from flwr.app import Context, Message, MessageType

from clients import entry
from clients.app import make_client_app
from clients.site_worker import serve
from clients.worker_protocol import key_path, read_or_create_key
from fed_asr import protocol as P
from fed_asr.wire import record_arrays

BIN = Path(sys.executable).parent


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    set_task_identity()


@pytest.fixture
def socket_path() -> Iterator[Path]:
    # Unix socket paths are limited to ~100 bytes: pytest's tmp_path can be longer
    folder = Path(os.environ.get("TMPDIR", "/tmp")) / f"fed-asr-w{os.getpid()}"
    folder.mkdir(mode=0o700, exist_ok=True)
    yield folder / "worker.sock"
    for path in folder.iterdir():
        path.unlink()
    folder.rmdir()


def _start_worker(socket: Path, count: int) -> threading.Thread:
    ready = threading.Event()
    thread = threading.Thread(
        target=serve,
        kwargs={"socket_path": socket, "max_connections": count, "on_ready": ready.set},
        daemon=True,
    )
    thread.start()
    assert ready.wait(60), "the worker did not start"
    return thread


def _with_worker(context: Context, socket: Path) -> Context:
    context.node_config[P.NODE_SITE_WORKER] = str(socket)
    return context


@pytest.fixture
def setup(run_overrides):  # type: ignore[no-untyped-def]
    run_config, _, arrays = first_site(run_overrides("worker", method="asr_local"))
    return run_config, arrays


def _stage_end(arrays) -> Message:  # type: ignore[no-untyped-def]
    kind = f"{MessageType.QUERY}.{P.SPECTRUM_ACTION}"
    return message(kind, {P.ARRAYS_RECORD: arrays}, {P.STAGE_KEY: 0})


def _evaluate(arrays) -> Message:  # type: ignore[no-untyped-def]
    return message(
        MessageType.EVALUATE, {P.ARRAYS_RECORD: arrays}, {P.NUM_SEEN_STAGES_KEY: 2}
    )


def test_worker_replies_and_state_equal_the_in_process_ones(
    setup, socket_path: Path
) -> None:  # type: ignore[no-untyped-def]
    # Prepare: the same two messages, in this process and through the worker
    run_config, arrays = setup
    local_ctx = node_context(run_config, 0)
    worker_ctx = _with_worker(node_context(run_config, 0), socket_path)
    thread = _start_worker(socket_path, count=2)
    # Execute: the stage end stores asr_local's own spectrum in context.state
    local = [
        make_client_app()(m, local_ctx) for m in (_stage_end(arrays), _evaluate(arrays))
    ]
    forwarded = [
        entry.app(m, worker_ctx) for m in (_stage_end(arrays), _evaluate(arrays))
    ]
    thread.join(30)
    # Assert: same metrics, same state left behind for the SuperNode to keep
    assert not thread.is_alive()
    assert [r.content[P.METRICS_RECORD] for r in forwarded] == [
        r.content[P.METRICS_RECORD] for r in local
    ]
    assert sorted(worker_ctx.state) == sorted(local_ctx.state) != []
    for name, record in local_ctx.state.array_records.items():
        ours = record_arrays(worker_ctx.state.array_records[name])
        for key, value in record_arrays(record).items():
            np.testing.assert_array_equal(ours[key], value)


def test_worker_refusal_is_the_apps_refusal(setup, socket_path: Path) -> None:  # type: ignore[no-untyped-def]
    # Prepare: a message type the ClientApp has no handler for
    run_config, arrays = setup
    thread = _start_worker(socket_path, count=1)
    bogus = message(f"{MessageType.QUERY}.nothing", {P.ARRAYS_RECORD: arrays}, {})
    # Execute / Assert: refused with the app's own reason, not handled twice
    with pytest.raises(RuntimeError, match="No query function registered"):
        entry.app(bogus, _with_worker(node_context(run_config, 0), socket_path))
    thread.join(30)
    assert not thread.is_alive()


@pytest.mark.parametrize("fault", ["no worker", "other code", "wrong key", "open key"])
def test_unusable_worker_falls_back_to_this_process_with_a_warning(
    setup,
    socket_path: Path,
    fault: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:  # type: ignore[no-untyped-def]
    # Prepare
    run_config, arrays = setup
    thread = None
    if fault != "no worker":
        thread = _start_worker(socket_path, count=1)
    if fault == "other code":
        monkeypatch.setattr(entry, "_digest", lambda: "0" * 64)
    elif fault == "wrong key":
        key_path(socket_path).write_bytes(os.urandom(32))
    elif fault == "open key":
        key_path(socket_path).chmod(0o644)
    # Execute
    with caplog.at_level(logging.INFO):
        reply = entry.app(
            _evaluate(arrays), _with_worker(node_context(run_config, 0), socket_path)
        )
    # Assert: answered here, and the log says why the worker was not used
    assert not reply.has_error()
    assert P.total_key(0) in reply.content[P.METRICS_RECORD]
    assert "site worker" in caplog.text and "not used" in caplog.text
    assert "(in-process)" in caplog.text
    if fault == "open key":  # never connected: let the worker take its connection
        key_path(socket_path).chmod(0o600)
        entry.app(
            _evaluate(arrays), _with_worker(node_context(run_config, 0), socket_path)
        )
    if thread is not None:
        thread.join(30)  # the worker answered or refused its one connection
        assert not thread.is_alive()


def test_key_file_is_private_and_reused(socket_path: Path) -> None:
    first = read_or_create_key(socket_path)
    assert read_or_create_key(socket_path) == first
    assert key_path(socket_path).stat().st_mode & 0o777 == 0o600
    assert len(first) == 32


def test_worker_command_serves_messages_in_its_own_process(
    setup, socket_path: Path
) -> None:  # type: ignore[no-untyped-def]
    # Prepare: the console script, as a site operator starts it
    run_config, arrays = setup
    proc = subprocess.Popen(
        [str(BIN / "fed-asr-site-worker"), "--socket", str(socket_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        _wait_for(lambda: socket_path.exists() or proc.poll() is not None)
        context = _with_worker(node_context(run_config, 1), socket_path)
        # Execute: two evaluations, as in two rounds
        replies = [entry.app(_evaluate(arrays), context) for _ in range(2)]
    finally:
        proc.terminate()
        output = proc.communicate(timeout=30)[0]
    # Assert: both handled by the worker (its log), same answers as here
    assert output.count("evaluate for node 101 handled") == 2, output
    local = make_client_app()(_evaluate(arrays), node_context(run_config, 1))
    for reply in replies:
        assert reply.content[P.METRICS_RECORD] == local.content[P.METRICS_RECORD]


def _wait_for(condition: Callable[[], bool], seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_timing_lines_parse_in_the_deployment_benchmark(
    setup,
    socket_path: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # type: ignore[no-untyped-def]
    # Prepare: one message in this process, two through a worker, as on a SuperNode
    from benchmarks.bench_deploy import parse_logs, summarize

    run_config, arrays = setup
    monkeypatch.setenv(entry.TIMING_ENV, "1")  # as deploy_local.sh sets it
    thread = _start_worker(socket_path, count=2)
    with caplog.at_level(logging.INFO):
        entry.app(_evaluate(arrays), node_context(run_config, 0))
        for _ in range(2):
            entry.app(
                _evaluate(arrays),
                _with_worker(node_context(run_config, 0), socket_path),
            )
    thread.join(30)
    (tmp_path / "supernode-0.log").write_text(caplog.text)
    (tmp_path / "site-worker-0.log").write_text(
        "x INFO [site-worker] evaluate for node 100 handled in 0.500 s\n"
        "x INFO [site-worker] evaluate for node 100 handled in 0.020 s\n"
    )
    # Execute
    messages, warm = parse_logs(tmp_path, nodes=1)
    summary = summarize(messages, {"evaluate": 0.02})
    # Assert: every message's line was read, the first worker message counts as cold
    assert [m["where"] for m in messages] == [
        "in-process",
        "site worker",
        "site worker",
    ]
    assert warm == {"evaluate": [0.02]}
    assert summary["all"]["messages"] == 3
    assert summary["evaluate"]["overhead_s"] == pytest.approx(
        summary["evaluate"]["node_s"] - 0.02
    )
    assert summary["all warm"]["messages"] == 2  # the first of a type is cold
    # A site executor's node: its handler line, then its whole task's line
    (tmp_path / "site-executor-1.log").write_text(
        caplog.records[-1].getMessage()
        + "\nINFO: [fed-asr] site executor: evaluate done in 0.250 s\n"
    )
    (tmp_path / "supernode-1.log").write_text("")
    executed, _ = parse_logs(tmp_path, nodes=2)
    assert executed[-1]["where"] == "site executor"
    assert executed[-1]["node_s"] == 0.25
    assert executed[-1]["outside_handler_s"] == pytest.approx(
        0.25 - executed[-1]["handler_s"]
    )
