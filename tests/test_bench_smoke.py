"""Every benchmark of bench/ runs end to end at tiny sizes, so none can rot.

No timing is asserted (benchmarks are not tests); only that each figure runs, reports the
keys the table and the goals read, and that the claim cycle completed every job exactly once.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest

from bench import report, suite
from bench.options import FIGURES, SMOKE


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("bench") / "results.json"
    log = io.StringIO()
    found = suite.run(SMOKE, out=out, log=log)
    assert found["errors"] == {}, log.getvalue()
    return found


def test_every_figure_reports_rows_with_ours_floors_and_ratios(results: dict[str, Any]) -> None:
    assert set(results["figures"]) == set(FIGURES)
    for name, figure in results["figures"].items():
        assert figure["rows"], name
        for row in figure["rows"]:
            assert {"figure", "name", "unit", "ours", "floors"} <= set(row)
            assert row["ours"]["median"] is not None, row["name"]
            for floor in row["floors"]:
                assert floor["median"] is not None and "ratio" in floor, row["name"]


def test_claim_cycle_completes_every_job_exactly_once(results: dict[str, Any]) -> None:
    runs = results["figures"]["claim"]["runs"]
    for w in SMOKE.claim_workers:
        for who in ("ours", "starlette+sqlite"):
            for run in runs[f"W={w}"][who]:
                assert run["exactly_once"] == 1, (who, run)
                assert run["double_completions"] == 0
                assert run["completed"] == SMOKE.claim_jobs  # drained: no time limit
        for run in runs[f"W={w}"]["ours"]:
            assert run["double_claims"] == 0 and run["left_live"] == 0


def test_postgres_claim_cycle_completes_every_job_exactly_once_on_both_sides(
    results: dict[str, Any],
) -> None:
    """Figure 7 on a throwaway cluster: ours (PostgresQueue) and the raw SKIP LOCKED floor
    each drain the queue, and the database says each job completed once."""
    runs = results["figures"]["postgres"]["runs"]
    for w in SMOKE.pg_workers:
        for side in ("ours", "raw skip locked"):
            [run] = runs[f"W={w}"][side]
            assert run["exactly_once"] == 1, (side, run)
            assert run["double_completions"] == 0 and run["left_live"] == 0
            assert run["completed"] == SMOKE.claim_jobs  # drained: no time limit


def test_results_file_holds_the_run_and_every_goal_is_judged(results: dict[str, Any]) -> None:
    saved = json.loads(Path(results["out"]).read_text())
    assert saved["figures"].keys() == results["figures"].keys()
    assert {"cpus", "http", "loop", "synchronous"} <= set(saved["machine"])
    assert [g["goal"] for g in saved["goals"]] == [g.text for g in report.GOALS]
    assert all(g["verdict"] in ("PASS", "MISS", "n/a") for g in saved["goals"])
    verdicts = {g["goal"]: g["verdict"] for g in saved["goals"]}
    assert verdicts["0 double completions (and every run exactly once)"] == "PASS"
    assert verdicts["postgresql: every run exactly once, both sides"] == "PASS"


def test_report_prints_a_line_per_row_and_per_goal(results: dict[str, Any]) -> None:
    table = report.table(results)
    for row in report.rows(results):
        assert row["name"] in table
    assert report.goals_text(results["goals"]).count("\n") == len(report.GOALS) - 1


def test_simulated_lab_runs_the_real_policy_on_and_a_naive_retry_off(
    results: dict[str, Any],
) -> None:
    """Behaviour, not timing: every job ends in both modes; with the scheduler on, the
    code bug fails after fewer attempts, fewer attempts run out of GPU memory, more jobs
    complete and the flaky host is quarantined; off, no host ever is."""
    runs = results["figures"]["simulate"]["runs"]
    for on, off in zip(runs["on"], runs["off"], strict=True):
        for run in (on, off):
            assert run["left"] == 0 and run["completed"] + run["failed"] == SMOKE.sim_jobs
            assert set(run["by_model"]["seg-unet"]) == {"failed"}  # the bug never completes
        assert on["bug_attempts"] < off["bug_attempts"]
        assert on["oom_attempts"] < off["oom_attempts"]
        assert on["completed"] > off["completed"]
        assert on["flaky_detected_h"] is not None and on["quarantines"].get("a100-2", 0) >= 1
        assert off["flaky_detected_h"] is None and off["quarantines"] == {}


def test_postgres_profile_reports_cpu_per_cycle_and_statements(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """bench/postgres_profile.py (figure 7's profile): both sides run their cycles on a cluster
    with pg_stat_statements, and each reports CPU per cycle and its three statements."""
    from bench import postgres_profile

    found = postgres_profile.main(["--cycles", "20"])
    assert set(found) == {"ours", "raw skip locked"}
    for side in found.values():
        assert side["python_ms"] > 0 and side["server_ms"] >= 0
    printed = capsys.readouterr().out
    assert printed.count(" × ") >= 6  # three statements a side, each with its figures
    assert "CPU per cycle, floor / ours:" in printed
