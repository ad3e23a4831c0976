"""The receiver's clock: a wall-clock step must not requeue live jobs."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import cpu, job, manifest_text
from trainfleet.queue.base import Status
from trainfleet.receiver.settings import ReceiverSettings
from trainfleet.receiver.state import ReceiverState


class Clock:
    def __init__(self, at: float) -> None:
        self.at = at

    def __call__(self) -> float:
        return self.at


def test_wall_clock_step_does_not_make_live_jobs_stale(tmp_path: Path) -> None:
    manifest = tmp_path / "m.toml"
    manifest.write_text(manifest_text([job("a")]))
    wall, mono = Clock(1_000_000.0), Clock(50.0)
    state = ReceiverState(ReceiverSettings(manifest_path=manifest, state_dir=tmp_path / "s",
                                           stale_after_s=600.0), wall, mono)
    claim = state.queue.claim_next("w", cpu(), now=state.now())
    assert claim is not None
    wall.at += 7200.0  # an NTP step or a wrong RTC: two hours forward
    mono.at += 30.0
    assert state.sweep() == []
    assert state.queue.get(claim.job.job_id).status == Status.CLAIMED
    mono.at += 600.0  # now really silent for longer than stale_after_s
    assert state.sweep() == [claim.job.job_id]
    state.queue.close()


def test_silence_before_the_receiver_started_never_counts(tmp_path: Path) -> None:
    manifest = tmp_path / "m.toml"
    manifest.write_text(manifest_text([job("a")]))
    settings = ReceiverSettings(manifest_path=manifest, state_dir=tmp_path / "s")
    first = ReceiverState(settings, Clock(1_000_000.0), Clock(0.0))
    claim = first.queue.claim_next("w", cpu(), now=first.now())
    assert claim is not None
    first.queue.close()
    mono = Clock(0.0)
    second = ReceiverState(settings, Clock(1_000_000.0 + 86400), mono)  # down for a day
    assert second.sweep() == []
    mono.at += 601.0
    assert second.sweep() == [claim.job.job_id]
    second.queue.close()
