"""The trace pages in a real browser (headless Chromium driven by Playwright) against a
real ``zerver demo`` process: summary, samples, waterfall, span details, escaping.

Skipped when Chromium or Playwright is missing, except under ``CI=true`` where that
fails. ``ZERVER_UPDATE_SCREENSHOTS=1`` also writes the screenshots docs/tracez.md shows.
"""

from __future__ import annotations

import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from demo_process import operator_env, zerver_process
from support import require

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ROOT = "http.server: GET /blogs/posts/{id}"
IMAGES = Path(__file__).resolve().parent.parent / "docs" / "images"
HOSTILE = "/x<script>alert(1)</script>"


def _missing() -> str | None:
    if not os.path.exists(CHROMIUM):
        return f"no Chromium at {CHROMIUM} (Debian's chromium package)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (the test extra)"
    return None


@pytest.fixture
def browser_context(tmp_path: Path) -> Iterator[Any]:
    require(_missing())
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(tmp_path / "profile"),
            executable_path=CHROMIUM,
            args=ARGS,
            headless=True,
            viewport={"width": 1280, "height": 720},
        )
        context.set_default_timeout(15_000)
        try:
            yield context
        finally:
            context.close()


def _raw_get(port: int, target: str) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(f"GET {target} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n".encode())
        while s.recv(65536):
            pass


def _save(path: Path, name: str) -> None:
    if os.environ.get("ZERVER_UPDATE_SCREENSHOTS") == "1":
        IMAGES.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, IMAGES / name)


def test_summary_samples_and_waterfall_in_chromium(browser_context: Any, tmp_path: Path) -> None:
    # One effect worker: the request's task runs the post's read for it, and the
    # author's cache read waits in the queue meanwhile, a queue wait to promote.
    env = operator_env(
        tmp_path, tmp_path / "state", ZER_VER_PROMOTE_QUEUE_MS="0", ZER_VER_WORKERS_EFFECTS="1"
    )
    env.pop("ZER_VER_ZPAGES", None)  # the demo turns the pages on by itself
    with zerver_process(["demo", "--db", str(tmp_path / "demo.sqlite3")], env, tmp_path) as (
        _proc,
        port,
        _lines,
    ):
        base = f"http://127.0.0.1:{port}"
        with httpx.Client() as c:
            for i in range(5):
                assert c.get(f"{base}/blogs/posts/{i % 2 + 1}").status_code == 200
            assert c.get(f"{base}/healthz").status_code == 200
        _raw_get(port, HOSTILE)

        page = browser_context.new_page()
        dialogs: list[str] = []

        def on_dialog(dialog: Any) -> None:  # a script ran: the test fails below
            dialogs.append(dialog.message)
            dialog.dismiss()

        page.on("dialog", on_dialog)
        external: list[str] = []
        page.on(
            "request",
            lambda r: None if r.url.startswith(base) else external.append(r.url),
        )

        # The summary lists the demo's span names with their counts.
        page.goto(f"{base}/debug/tracez")
        rows = page.locator("#summary tbody tr")
        names = rows.locator("th.name").all_inner_texts()
        assert ROOT in names and "http.server: GET /healthz" in names
        assert "db.get blog_post" in names and "http.server: GET" in names
        root_row = rows.filter(has=page.locator("th.name", has_text=ROOT)).first
        cells = root_row.locator("td").all_inner_texts()
        running, errors, buckets = cells[0], cells[1], [int(x) for x in cells[2:]]
        assert (running, errors, sum(buckets), len(buckets)) == ("0", "0", 5, 9)
        shot = tmp_path / "tracez-summary.png"
        page.screenshot(path=str(shot), full_page=True)
        _save(shot, "tracez-summary.png")

        # Clicking a bucket lists its samples.
        bucket = next(i for i, n in enumerate(buckets) if n)
        root_row.locator("td").nth(2 + bucket).locator("a").click()
        page.wait_for_selector("#samples")
        sample_rows = page.locator("#samples tbody tr")
        assert 1 <= sample_rows.count() <= buckets[bucket]  # one per 10 ms at most
        assert ROOT in page.locator("#samples-title").inner_text()
        assert "/blogs/posts/{id}" in sample_rows.first.inner_text()

        # Opening a sample shows its waterfall: one bar per span, the promoted queue wait.
        trace_id = sample_rows.first.locator("a.trace").inner_text()
        sample_rows.first.locator("a.trace").click()
        page.wait_for_selector("#waterfall")
        with httpx.Client() as c:
            spans = c.get(f"{base}/debug/tracez/api/traces/{trace_id}").json()["spans"]
        bars = page.locator("#waterfall .bar")
        assert bars.count() == len(spans)
        assert page.locator('#waterfall .bar[data-name="job.queue_wait"]').count() >= 1
        assert page.locator("#waterfall .seg.queue_wait").count() >= 1
        assert page.locator("#waterfall .seg.run").count() >= 1

        # Clicking a span shows its attributes, events and status.
        page.locator("#waterfall tr.span", has_text="db.get blog_post").first.click()
        page.wait_for_selector("#details:not([hidden])")
        assert "db.get blog_post" in page.locator("#details-name").inner_text()
        assert "status OK" in page.locator("#details-status").inner_text()
        attrs = page.locator("#details-attributes").inner_text()
        assert "db.system" in attrs and "segment park(io_wait)" in attrs
        assert "zerver.job.completed" in page.locator("#details-events").inner_text()
        page.locator("#waterfall tr.span", has_text="cache.get author_profile").first.click()
        page.wait_for_selector("#details-name:has-text('cache.get author_profile')")
        assert "segment queue_wait" in page.locator("#details-attributes").inner_text()
        shot = tmp_path / "tracez-waterfall.png"
        page.screenshot(path=str(shot), full_page=True)
        _save(shot, "tracez-waterfall.png")

        # A request whose path holds a script tag is shown as text, never run.
        page.goto(f"{base}/debug/tracez")
        unrouted = rows.filter(has=page.locator("th.name", has_text="http.server: GET")).filter(
            has_not=page.locator("th.name", has_text="/")
        )
        with httpx.Client() as c:
            row = next(
                r
                for r in c.get(f"{base}/debug/tracez/api/summary").json()["spans"]
                if r["name"] == "http.server: GET"
            )
        assert sum(row["latency"]) == 1  # no icon request reached the app
        bucket = next(i for i, n in enumerate(row["latency"]) if n)
        unrouted.locator("td").nth(2 + bucket).locator("a").click()
        page.wait_for_selector("#samples")
        assert HOSTILE in page.locator("#samples").inner_text()
        page.locator("#samples a.trace").first.click()
        page.wait_for_selector("#waterfall")
        page.locator("#waterfall tr.span").first.click()
        page.wait_for_selector("#details:not([hidden])")
        assert HOSTILE in page.locator("#details-attributes").inner_text()
        assert dialogs == [] and external == []
