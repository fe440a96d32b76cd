"""No trace lost: real servers, a real OTLP receiver on 127.0.0.1, real faults.

Each test runs ``zerver run`` (with the exporter process, and with the in-process
pipeline where both apply), sends requests whose trace ids it chose, breaks
something (the receiver, the exporter process, the server itself, the spool
file), and checks that every trace arrives, or that what could not is counted
and reported, with the server's own log lines.
"""

from __future__ import annotations

import itertools
import os
import signal
import socket
import threading
import time
from pathlib import Path

import pytest
from durability import (
    START_S,
    Server,
    server,
    server_trace_ids,
    spool_stats,
    spooled_spans,
    wait_until,
)

from zerver.export import OtlpReceiver, ReceivedRequest, Reply

pytestmark = pytest.mark.slow

SPANS_PER_REQUEST = 3  # http.server, step.route_match, step.hello
MODES = [pytest.param("on", id="exporter-process"), pytest.param("off", id="in-process")]
ARRIVE_S = 30.0


def env(port: int, process: str, **extra: str) -> dict[str, str]:
    return {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
        "ZER_VER_EXPORT_PROCESS": process,
        "ZER_VER_EXPORT_BREAKER_COOLDOWN_MS": "500",
        **extra,
    }


def closed_port() -> int:
    """A port nothing listens on (bound and released: connections are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def all_arrive(receiver: OtlpReceiver, ids: list[str]) -> None:
    wanted = set(ids)
    wait_until(
        lambda: wanted <= server_trace_ids(receiver),
        ARRIVE_S,
        f"{len(wanted)} traces (have {len(wanted & server_trace_ids(receiver))})",
        step_s=0.1,
    )


def exit_line(s: Server) -> dict[str, object]:
    [line] = s.events("trace export stopped")
    return line


@pytest.mark.parametrize("process", MODES)
def test_an_outage_under_load_loses_nothing(tmp_path: Path, process: str) -> None:
    with OtlpReceiver() as receiver, server(tmp_path, env(receiver.port, process)) as s:
        ids = s.get(100)
        all_arrive(receiver, ids)
        receiver.stop()
        # More spans than the in-memory buffer holds (2048): they must reach the spool.
        ids += s.get(1000)
        s.wait_event("otlp export failed; spooling batches until the backend answers", 10)
        wait_until(lambda: spool_stats(tmp_path / "spool")[0] > 0, 10, "a spooled batch")
        receiver.start()
        ids += s.get(100)
        all_arrive(receiver, ids)
        code, _ = s.stop()
    assert code == 0
    stopped = exit_line(s)
    assert stopped["spans_dropped"] == {}
    assert int(str(stopped["spans_spooled"])) > 0
    assert not s.events("spans dropped")
    assert spool_stats(tmp_path / "spool") == (0, 0)


def test_a_killed_exporter_process_is_restarted_and_nothing_is_lost(tmp_path: Path) -> None:
    with OtlpReceiver() as receiver, server(tmp_path, env(receiver.port, "on")) as s:
        ids = s.get(300)
        os.kill(s.exporter_pid(), signal.SIGKILL)
        ids += s.get(300)
        died = s.wait_event("exporter process died; restarting it", 10)
        assert died["exit"] == "killed by SIGKILL"
        ids += s.get(300)
        all_arrive(receiver, ids)
        code, _ = s.stop()
    assert code == 0
    stopped = exit_line(s)
    assert stopped["restarts"] == 1
    assert stopped["records_lost"] == 0 and stopped["records_dropped"] == 0


@pytest.mark.parametrize("process", MODES)
def test_a_killed_server_leaves_a_spool_the_next_start_delivers(
    tmp_path: Path, process: str
) -> None:
    down = closed_port()
    with server(tmp_path, env(down, process)) as s:
        ids = s.get(200)
        # Everything is on disk (as spans, or as records the exporter process kept).
        want = len(ids) * SPANS_PER_REQUEST
        wait_until(
            lambda: spooled_spans(tmp_path / "spool", SPANS_PER_REQUEST) >= want,
            20,
            "every trace in the spool",
        )
        s.kill_all()
    with OtlpReceiver() as receiver, server(tmp_path, env(receiver.port, process)) as again:
        all_arrive(receiver, ids)
        code, _ = again.stop()
    assert code == 0
    assert spool_stats(tmp_path / "spool") == (0, 0)


def test_a_full_spool_drops_counts_and_logs_at_once(tmp_path: Path) -> None:
    quota = env(closed_port(), "off", ZER_VER_EXPORT_SPOOL_MAX_MB="1")
    with server(tmp_path, quota) as s:
        s.get(3000)  # ~9000 spans of OTLP/JSON: several MB
        refused = s.wait_event("spool refused an item; dropped", 20)
        assert refused["reason"] == "full"
        reported = s.wait_event("spans dropped", 20)  # logged while serving, not at exit
        assert reported["dropped"]["spool_full"] > 0
        code, _ = s.stop()
    assert code == 0
    stopped = exit_line(s)
    dropped = stopped["spans_dropped"]
    assert isinstance(dropped, dict) and set(dropped) == {"spool_full"}
    spooled = int(str(stopped["spans_spooled"]))
    assert spooled + dropped["spool_full"] == 3000 * SPANS_PER_REQUEST
    assert spool_stats(tmp_path / "spool")[1] == spooled


def test_the_spool_knows_how_full_it_is(tmp_path: Path) -> None:
    """``Spool.fill`` (what the exporter process's CPU share reads per batch) grows with
    each write, without reading the file, and is 1 once an item is refused."""
    from zerver.export import Spool

    with Spool(tmp_path / "spool", max_bytes=1 << 20) as spool:
        assert spool.fill == 0.0
        fills = []
        for _ in range(40):  # bounded: 40 x 50 kB is twice the quota
            if not spool.put("otlp", b"x" * 50_000, 1):
                break
            fills.append(spool.fill)
        assert len(fills) >= 10
        assert fills == sorted(fills)
        assert 0 < fills[0] < 0.2 and 0.8 < fills[-1] <= 1.0
        assert spool.fill == 1.0


def test_a_damaged_spool_file_delivers_its_intact_batches(tmp_path: Path) -> None:
    with server(tmp_path, env(closed_port(), "off", OTEL_BSP_MAX_EXPORT_BATCH_SIZE="60")) as s:
        ids = s.get(400)  # 1200 spans: 20 batches of 60
        code, _ = s.stop()
    assert code == 0
    items, _ = spool_stats(tmp_path / "spool")
    assert items >= 10
    db = tmp_path / "spool" / "spool.sqlite3"
    data = bytearray(db.read_bytes())
    middle = len(data) // 2 // 4096 * 4096
    data[middle : middle + 4096] = b"\xa5" * 4096  # one page of garbage
    db.write_bytes(bytes(data))
    with OtlpReceiver() as receiver, server(tmp_path, env(receiver.port, "off")) as again:
        damaged = again.wait_event(
            "spool database damaged: moved aside, intact items salvaged into a fresh one", 10
        )
        assert int(damaged["salvaged_items"]) > 0
        wait_until(lambda: spool_stats(tmp_path / "spool")[0] == 0, ARRIVE_S, "replay")
        code, _ = again.stop()
    assert code == 0
    arrived = server_trace_ids(receiver)
    assert arrived <= set(ids)
    assert len(arrived) >= 400 * int(damaged["salvaged_items"]) // items // 2
    assert list(tmp_path.joinpath("spool").glob("damaged-*.sqlite3"))


@pytest.mark.parametrize("process", MODES)
def test_no_collector_exits_within_two_seconds_with_the_spool_written(
    tmp_path: Path, process: str
) -> None:
    with server(tmp_path, env(closed_port(), process)) as s:
        ids = s.get(200)
        code, took = s.stop()
    assert code == 0
    assert took < 2.0, f"took {took:.2f} s to exit"
    stopped = exit_line(s)
    assert stopped["spool"] == str(tmp_path / "spool")
    assert int(str(stopped["spool_items"])) > 0
    assert stopped["spans_dropped"] == {} and not stopped.get("records_lost")
    assert spool_stats(tmp_path / "spool")[0] > 0
    assert spooled_spans(tmp_path / "spool", SPANS_PER_REQUEST) == len(ids) * SPANS_PER_REQUEST


@pytest.mark.parametrize("process", MODES)
def test_a_second_signal_exits_at_once(tmp_path: Path, process: str) -> None:
    # A collector that never answers in time: a graceful stop would wait for it.
    with OtlpReceiver(delay_s=30) as receiver:
        s = Server(tmp_path, env(receiver.port, process, ZER_VER_SHUTDOWN_TIMEOUT_S="20"))
        try:
            s.start()
            s.get(100)
            s.signal(signal.SIGTERM)
            s.wait_event("signal received; shutting down", 5)
            # Past the window in which a second signal is taken for the first one again.
            time.sleep(0.6)
            s.signal(signal.SIGTERM)
            code, took = s.wait(10)
        finally:
            s.close()
    assert code == 128 + signal.SIGTERM
    assert took < 2.0, f"took {took:.2f} s to exit"
    assert s.events("second signal; stopping at once")
    assert s.events("trace export abandoned")
    assert "Traceback" not in s.output()


@pytest.mark.parametrize("after_s", [0.0, 0.25, 0.5])
def test_ctrl_c_just_after_start_prints_no_traceback_and_counts(
    tmp_path: Path, after_s: float
) -> None:
    with OtlpReceiver() as receiver:
        s = Server(tmp_path, env(receiver.port, "on"))
        try:
            s.start()  # the exporter process may still be starting
            time.sleep(after_s)
            s.signal(signal.SIGINT)
            code, _ = s.wait(20)
        finally:
            s.close()
    assert code == 0, s.output()
    assert "Traceback" not in s.output()
    assert "KeyboardInterrupt" not in s.output()
    stopped = exit_line(s)
    assert stopped["records"] == 0 and stopped["records_lost"] == 0


def test_ctrl_c_while_the_app_is_loading_prints_no_traceback(tmp_path: Path) -> None:
    s = Server(tmp_path, env(closed_port(), "on"))
    try:
        s.launch()
        # The CLI has parsed its arguments once it validates the settings: from then on
        # a signal is held until the server can stop gracefully.
        wait_until(lambda: s.events("trace export"), START_S, "telemetry set-up")
        s.signal(signal.SIGINT)
        code, _ = s.wait(20)
    finally:
        s.close()
    assert code == 0, s.output()
    assert "Traceback" not in s.output()
    assert s.events("signal received during start-up; shutting down")
    assert s.events("trace export stopped")


def test_retry_after_longer_than_the_export_deadline_loses_nothing(tmp_path: Path) -> None:
    refuse_until = [float("inf")]
    refusals: list[float] = []
    lock = threading.Lock()

    def busy(req: ReceivedRequest) -> Reply | None:
        with lock:
            if time.monotonic() < refuse_until[0]:
                refusals.append(time.monotonic())
                return Reply(503, headers=(("Retry-After", "2"),))
        return None

    with OtlpReceiver(responder=busy) as receiver:
        # Each batch may take 0.5 s, retries included: the backend asks for 2 s.
        slow = env(receiver.port, "off", OTEL_BSP_EXPORT_TIMEOUT="500")
        with server(tmp_path, slow) as s:
            ids = s.get(300)
            wait_until(lambda: len(refusals) >= 2, 20, "two 503 answers")
            with lock:
                refuse_until[0] = time.monotonic() + 1.0
            ids += s.get(300)
            all_arrive(receiver, ids)
            code, _ = s.stop()
    assert code == 0
    stopped = exit_line(s)
    assert stopped["spans_dropped"] == {}
    # Nothing was sent sooner than the backend asked.
    assert all(b - a >= 1.9 for a, b in itertools.pairwise(refusals))
