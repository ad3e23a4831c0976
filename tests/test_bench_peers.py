"""bench.peers (issue 8, item 6) runs end to end at tiny sizes, so it cannot rot.

No timing is asserted. trainfleet's side always runs and must complete every job exactly once;
each peer either ran and drained its queue exactly once by its own records, or was skipped
with the reason (its optional library or server is missing here), never silently dropped.
"""

from __future__ import annotations

import io
from typing import Any

import pytest

from bench.peers.__main__ import PEERS, UNAVAILABLE, run, table
from bench.peers.sides import Ours

JOBS = 30


@pytest.fixture(scope="module")
def results() -> dict[str, Any]:
    return run(JOBS, 0.0, (2,), 1, tuple(PEERS), log=io.StringIO())


def test_trainfleet_side_completes_every_job_exactly_once(results: dict[str, Any]) -> None:
    [ours] = results["runs"]["W=2"][Ours.name]
    assert ours["completed"] == JOBS  # drained: no time limit
    assert ours["exactly_once"] == 1 and ours["double_completions"] == 0
    assert ours["left_live"] == 0
    assert "synchronous=2" in results["durability"][Ours.name]  # FULL, as shipped


def test_each_peer_drains_exactly_once_or_is_skipped_with_its_reason(
    results: dict[str, Any],
) -> None:
    ran = set(results["runs"]["W=2"]) - {Ours.name}
    assert len(ran) + len(results["skipped"]) == len(PEERS)
    for key, reason in results["skipped"].items():
        assert reason and reason == UNAVAILABLE[key]()  # missing here, said so
    for name in ran:
        [peer] = results["runs"]["W=2"][name]
        assert peer["completed"] == JOBS, name
        assert peer["exactly_once"] == 1 and peer["double_completions"] == 0, name
        assert results["durability"][name], name
    rows = {row["name"] for row in results["rows"]}
    assert rows == {f"{name} W=2" for name in ran}
    assert all(row["floors"][0]["ratio"]["median"] > 0 for row in results["rows"])


def test_table_has_a_line_per_side_and_names_what_was_skipped(results: dict[str, Any]) -> None:
    text = table(results)
    for name in results["runs"]["W=2"]:
        assert f"{name} W=2" in text
    for key in results["skipped"]:
        assert f"skipped {key}:" in text
