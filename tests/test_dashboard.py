"""The dashboard page: served self-contained, and live in a real Chromium against real state.

The receiver runs in a real uvicorn on a socket bound to 127.0.0.1:0; state is made through
trainfleet.client.Client as a worker would; the browser is Debian's chromium via playwright.
"""

from __future__ import annotations

import re
import shutil
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from tests import live
from tests.conftest import cpu, gpu, job, manifest_text
from trainfleet.capability import Capability, Gpu
from trainfleet.client import Client
from trainfleet.receiver import ReceiverSettings

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
OPERATOR_TOKEN = "dashboard-operator-token"
BROWSER_TIMEOUT_MS = 15_000  # two polls are 4 s; leave room for a slow CI machine
OOM = "RuntimeError: CUDA out of memory (distinctive)"
# The second line is markup on purpose: the page must show it as text, never render it.
ERROR = OOM + "\n  while allocating <b id='injected'>tensor & friends</b>"
PAGE_IDS = {
    "counts", "jobs", "workers", "failures", "detail", "filter-status", "filter-model",
    "detail-attempts", "detail-log", "detail-fields", "detail-close", "conn",
}


@dataclass
class Receiver:
    url: str
    host: str
    port: int

    def client(self) -> Client:
        return Client(self.url, operator_token=OPERATOR_TOKEN, timeout_s=10.0, retries=0)

    def get(self, path: str) -> tuple[int, dict[str, str], str]:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(self.url + path, timeout=10.0) as response:
            body = response.read().decode("utf-8")
            return response.status, dict(response.headers), body


@contextmanager
def serving(root: Path, jobs: list[dict[str, Any]]) -> Iterator[Receiver]:
    """A receiver with its own manifest and state dir under `root`, in uvicorn on a thread."""
    root.mkdir()
    manifest_path = root / "manifest.toml"
    manifest_path.write_text(manifest_text(jobs))
    settings = ReceiverSettings(manifest_path=manifest_path, state_dir=root / "state",
                                operator_token=OPERATOR_TOKEN, worker_token=None)
    with live.serving(settings) as (host, port):
        yield Receiver(f"http://{host}:{port}", host, port)


class _Ids(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.ids: set[str] = set()
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        self.ids.update(value for name, value in attrs if name == "id" and value)


# -- the page, without a browser ----------------------------------------------


def test_dashboard_page_is_self_contained_html(tmp_path: Path) -> None:
    with serving(tmp_path / "receiver", [job("alpha")]) as rx:
        status, headers, html = rx.get("/")
        _, _, openapi = rx.get("/openapi.json")
    assert status == 200
    assert headers["content-type"].startswith("text/html")
    assert not re.findall(r"https?://\S+", html), "the page must not load from other hosts"
    parsed = _Ids()
    parsed.feed(html)
    assert PAGE_IDS <= parsed.ids
    external = [(tag, attrs) for tag, attrs in parsed.tags
                if tag in ("link", "img", "iframe") or (tag == "script" and "src" in attrs)]
    assert external == []
    assert "connect-src 'self'" in headers["content-security-policy"]
    assert '"/"' in openapi and "text/html" in openapi


# -- the page, live in Chromium -----------------------------------------------


def _make_state(rx: Receiver) -> dict[str, str]:
    """alpha running at 42 %, beta failed for good, gamma pending: their job ids by name."""
    client = rx.client()
    running = client.claim("w-gpu-1", gpu().to_dict())
    assert running is not None and running["job"]["name"] == "alpha"
    alpha = running["job"]["job_id"]
    client.heartbeat(alpha, running["lease"], {"fraction": 0.42, "message": "epoch 42/100"},
                     "epoch 41/100 loss=0.318\nepoch 42/100 loss=0.301\n")
    failing = client.claim("w-cpu-1", cpu().to_dict())
    assert failing is not None and failing["job"]["name"] == "beta"
    beta = failing["job"]["job_id"]
    failed = client.fail(beta, failing["lease"], ERROR, retryable=False, kind="trainer_error")
    assert failed["status"] == "failed"
    gamma = next(j["job_id"] for j in client.jobs() if j["name"] == "gamma")
    return {"alpha": alpha, "beta": beta, "gamma": gamma, "alpha_lease": running["lease"]}


@pytest.mark.slow
@pytest.mark.skipif(not CHROMIUM.exists(), reason=f"needs Debian's chromium at {CHROMIUM}")
def test_dashboard_shows_live_progress_failures_and_job_detail(tmp_path: Path) -> None:
    sync_api = pytest.importorskip("playwright.sync_api", reason="needs the playwright package")
    expect = sync_api.expect
    jobs = [job("alpha", priority=2), job("beta", model="mlp", priority=1),
            job("gamma", model="transformer")]
    with serving(tmp_path / "receiver", jobs) as rx, sync_api.sync_playwright() as p:
        ids = _make_state(rx)
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1440, "height": 900})
            page.set_default_timeout(BROWSER_TIMEOUT_MS)
            page.goto(rx.url + "/")

            alpha_row = page.locator(f"#jobs tr[data-job-id='{ids['alpha']}']")
            expect(alpha_row.locator(".pct")).to_have_text("42%")
            expect(alpha_row).to_contain_text("epoch 42/100")
            expect(alpha_row).to_contain_text("running")
            expect(page.locator("#failures")).to_contain_text(OOM)
            expect(page.locator(f"#failures li[data-job-id='{ids['beta']}']")).to_have_count(1)
            expect(page.locator(f"#failures li[data-job-id='{ids['gamma']}']")).to_have_count(0)
            expect(page.locator("#counts [data-status='failed'] .n")).to_have_text("1")
            expect(page.locator("#workers")).to_contain_text("w-gpu-1")
            expect(page.locator("#workers")).to_contain_text("Test GPU")
            page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)

            # Live: the next heartbeat shows up without a reload.
            rx.client().heartbeat(ids["alpha"], ids["alpha_lease"], {"fraction": 0.5})
            expect(alpha_row.locator(".pct")).to_have_text("50%")

            # Filters narrow the table.
            page.select_option("#filter-model", "mlp")
            expect(page.locator("#jobs tbody tr")).to_have_count(1)
            page.select_option("#filter-model", "")
            page.select_option("#filter-status", "pending")
            expect(page.locator("#jobs tbody tr")).to_have_count(1)
            expect(page.locator(f"#jobs tr[data-job-id='{ids['gamma']}']")).to_have_count(1)
            page.select_option("#filter-status", "")

            page.locator(f"#jobs tr[data-job-id='{ids['beta']}']").click()
            detail = page.locator("#detail")
            expect(detail).to_be_visible()
            expect(page.locator("#detail-title")).to_have_text("beta")
            attempt = page.locator("#detail-attempts tr[data-attempt='1']")
            expect(attempt).to_contain_text("w-cpu-1")
            expect(attempt).to_contain_text("trainer_error")
            expect(attempt).to_contain_text(OOM)
            expect(page.locator("#detail-log")).to_have_text("no log yet")
            expect(page.locator("#detail-fields")).to_contain_text(ids["beta"])
            expect(detail).to_contain_text("<b id='injected'>tensor & friends</b>")
            assert page.locator("#injected").count() == 0
            page.screenshot(path=str(tmp_path / "dashboard-detail.png"))

            page.locator("#detail-close").click()
            expect(detail).to_be_hidden()
        finally:
            browser.close()
    shutil.copyfile(tmp_path / "dashboard.png", "/tmp/dashboard.png")
    shutil.copyfile(tmp_path / "dashboard-detail.png", "/tmp/dashboard-detail.png")


@pytest.mark.slow
@pytest.mark.skipif(not CHROMIUM.exists(), reason=f"needs Debian's chromium at {CHROMIUM}")
def test_workers_panel_shows_each_slot_what_it_runs_and_a_quarantined_host(
    tmp_path: Path,
) -> None:
    sync_api = pytest.importorskip("playwright.sync_api", reason="needs the playwright package")
    expect = sync_api.expect
    jobs = [job("train-big", priority=9), *(job(f"broken-{i}", priority=5) for i in range(3))]
    with serving(tmp_path / "receiver", jobs) as rx, sync_api.sync_playwright() as p:
        client = rx.client()
        duo = Capability(hostname="duo", os="linux", cpu_count=16, ram_gib=64.0, cuda=True,
                         gpus=(Gpu(0, "Test GPU", 24.0),))
        running = client.claim("duo-1234-gpu0", duo.to_dict())
        assert running is not None and running["job"]["name"] == "train-big"
        assert client.claim("duo-1234-cpu0", cpu("duo").to_dict(), slot=1,
                            deny_jobs=["gbt"]) is None  # an idle slot...
        duo1 = Capability(hostname="duo", os="linux", cpu_count=16, ram_gib=64.0, cuda=True,
                          gpus=(Gpu(1, "Test GPU", 24.0),))
        assert client.claim("duo-1234-gpu1", duo1.to_dict(), slot=2,
                            deny_jobs=["gbt"]) is None  # ...one lent to gpu0's job...
        client.heartbeat(running["job"]["job_id"], running["lease"],
                         lent_slots=["duo-1234-gpu1"])
        for i in range(3):  # ...and a host whose last three jobs failed alike
            got = client.claim("flaky-5678", cpu("flaky").to_dict())
            assert got is not None
            client.fail(got["job"]["job_id"], got["lease"], f"RuntimeError: fault {i}", False,
                        "trainer_error", {"cause": "trainer_error",
                                          "signature": f"RuntimeError: fault {i}"})
        [flaky] = [w for w in client.workers() if w["hostname"] == "flaky"]
        assert flaky["quarantined_until"] is not None
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1440, "height": 900})
            page.set_default_timeout(BROWSER_TIMEOUT_MS)
            page.goto(rx.url + "/")
            gpu0 = page.locator("#workers tr[data-worker-id='duo-1234-gpu0']")
            expect(gpu0.locator("td").nth(1)).to_have_text("gpu0")
            expect(gpu0).to_contain_text("train-big")
            cpu0 = page.locator("#workers tr[data-worker-id='duo-1234-cpu0']")
            expect(cpu0.locator("td").nth(1)).to_have_text("cpu0")
            expect(cpu0.locator("td").last).to_have_text("—")
            gpu1 = page.locator("#workers tr[data-worker-id='duo-1234-gpu1']")
            expect(gpu1.locator("td").last).to_have_text("lent to train-big")
            row = page.locator("#workers tr[data-worker-id='flaky-5678']")
            expect(row.locator(".quarantine")).to_be_visible()
            expect(row.locator(".quarantine")).to_have_text("quarantined")
            expect(row.locator(".quarantine-reason")).to_contain_text(
                flaky["quarantine_reason"])
            expect(gpu0.locator(".quarantine")).to_have_count(0)
            page.screenshot(path=str(tmp_path / "dashboard-workers.png"), full_page=True)
        finally:
            browser.close()
