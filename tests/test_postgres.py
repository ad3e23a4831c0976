"""PostgreSQL specifics: the claim statement, the schema, several receivers on one database,
and `trainfleet db upgrade / migrate`. The contract suite runs on PostgreSQL too (conftest)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from tests.conftest import cpu, gpu, job, make_manifest, manifest_text
from tests.pg import Cluster
from trainfleet import cli, manifest
from trainfleet.errors import DatabaseUnavailable, TrainfleetError
from trainfleet.migrate import migrate
from trainfleet.queue import open_queue
from trainfleet.queue.base import FailureKind, JobQueue, Status
from trainfleet.queue.postgres import CLAIM, CLAIMS, ORDER_CPU, ORDER_CUDA, PostgresQueue
from trainfleet.queue.postgres import SCHEMA_VERSION as PG_VERSION
from trainfleet.queue.sqlite import SCHEMA_VERSION as SQLITE_VERSION
from trainfleet.queue.sqlite import SqliteQueue
from trainfleet.tokens import TokenKind, hash_token

T0 = 1_000_000.0


@pytest.fixture
def url(pg_cluster: Cluster) -> str:
    return pg_cluster.fresh_schema()


@pytest.fixture
def pg(url: str) -> Iterator[PostgresQueue]:
    q = PostgresQueue(url)
    yield q
    q.close()


# -- the claim ---------------------------------------------------------------


def test_claim_is_one_update_of_one_row_picked_with_skip_locked() -> None:
    assert CLAIM.count("UPDATE jobs SET") == 1
    assert "WHERE job_id = (\n        SELECT j.job_id FROM jobs AS j" in CLAIM
    assert "LIMIT 1\n        FOR UPDATE SKIP LOCKED\n    ) AND status = 'pending'" in CLAIM


def test_claim_skips_a_job_another_transaction_holds_instead_of_waiting(
    pg: PostgresQueue, url: str
) -> None:
    pg.sync_manifest(make_manifest([job("first", priority=1), job("second")]), now=T0)
    with psycopg.connect(url) as other:  # an open transaction holding the best job's row
        other.execute("SELECT 1 FROM jobs WHERE name = 'first' FOR UPDATE")
        claim = pg.claim_next("w", cpu(), now=T0)
        assert claim is not None and claim.job.name == "second"
    claim = pg.claim_next("w", cpu(), now=T0)
    assert claim is not None and claim.job.name == "first"


@pytest.mark.parametrize("order", [ORDER_CPU, ORDER_CUDA])
def test_claim_walks_the_partial_index_without_sorting(pg: PostgresQueue, url: str,
                                                       order: str) -> None:
    pg.sync_manifest(make_manifest([job(f"j{i}", seed=i) for i in range(50)]), now=T0)
    params = {"lease": "x", "worker_id": "w", "hostname": "h", "now": T0, "cuda": False,
              "vram": 0.0, "ram": 8.0, "gpus": 0, "allow": None, "deny": [], "stale_after_s": 600.0,
              "hosts_md5": None, "free": None}
    with psycopg.connect(url) as conn:
        conn.execute("SET enable_seqscan = off")
        plan = "\n".join(row[0] for row in conn.execute(
            "EXPLAIN " + CLAIM.format(order=order), params))
    index = "jobs_pending_cuda" if order == ORDER_CUDA else "jobs_pending_cpu"
    assert f"Index Scan using {index}" in plan
    assert "Sort" not in plan


@pytest.mark.parametrize("order", [ORDER_CPU, ORDER_CUDA])
def test_claim_as_the_queue_sends_it_runs_a_generic_plan_that_walks_the_index(
    pg: PostgresQueue, url: str, order: str
) -> None:
    """The queue prepares the claim and forces its generic plan (planned once, not on every
    claim), so that plan must walk the partial index too. auto_explain hands back the plan
    the server actually ran."""
    pg.sync_manifest(make_manifest([job(f"j{i}", seed=i) for i in range(50)]), now=T0)
    params = {"lease": "x", "worker_id": "w", "hostname": "h", "now": T0, "cuda": False,
              "vram": 0.0, "ram": 8.0, "gpus": 0, "allow": None, "deny": [], "stale_after_s": 600.0,
              "hosts_md5": pg._host_policies[0], "free": None}
    plans: list[str] = []
    with psycopg.connect(url) as conn:
        conn.add_notice_handler(lambda notice: plans.append(notice.message_primary or ""))
        for setting in ("LOAD 'auto_explain'", "SET auto_explain.log_min_duration = 0",
                        "SET auto_explain.log_level = notice", "SET enable_seqscan = off",
                        "SET plan_cache_mode = force_generic_plan"):
            conn.execute(setting)
        conn.execute(CLAIMS[False, order], params, prepare=True)
        conn.rollback()
    plan = next(p for p in plans if "WITH picked AS" in p)
    index = "jobs_pending_cuda" if order == ORDER_CUDA else "jobs_pending_cpu"
    assert f"Index Scan using {index}" in plan
    assert "Sort" not in plan.split("Query Text:")[1].split("\n", 1)[1].replace("ORDER BY", "")
    assert "IS DISTINCT FROM $" in plan  # generic: the values are parameters, not constants


def test_pooled_connections_run_without_jit(pg: PostgresQueue) -> None:
    """With JIT on, the claim's large cost estimate had every claim compiled first (~1 s)."""
    with pg._connection() as conn:
        row = conn.execute("SHOW jit").fetchone()
    assert row is not None and row["jit"] == "off"


def test_calls_without_now_are_timed_by_the_database_clock(pg: PostgresQueue) -> None:
    pg.sync_manifest(make_manifest([job("a")]))
    before = pg.clock()
    claim = pg.claim_next("w", cpu())
    after = pg.clock()
    assert claim is not None
    assert claim.job.heartbeat_at is not None and before <= claim.job.heartbeat_at <= after
    assert pg.heartbeat(claim.job.job_id, claim.lease) == "continue"
    assert before <= pg.get(claim.job.job_id).heartbeat_at <= pg.clock()  # type: ignore[operator]


# -- the schema --------------------------------------------------------------


def test_schema_newer_than_code_is_refused(url: str) -> None:
    PostgresQueue(url).close()
    with psycopg.connect(url) as conn:
        conn.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    with pytest.raises(TrainfleetError, match="newer than this release"):
        PostgresQueue(url)


def test_receivers_opening_a_fresh_database_at_once_make_one_schema(url: str) -> None:
    opened: list[JobQueue] = []
    errors: list[BaseException] = []

    def open_one() -> None:
        try:
            opened.append(open_queue(url))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=open_one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == [] and len(opened) == 4
    for q in opened:
        q.close()


def test_db_upgrade_creates_then_reports_up_to_date(url: str, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["db", "upgrade", "--db", url]) == 0
    assert f"no schema -> schema version {PG_VERSION}" in capsys.readouterr().out
    assert cli.main(["db", "upgrade", "--db", url]) == 0
    assert f"schema version {PG_VERSION}, up to date" in capsys.readouterr().out
    sqlite_url = f"sqlite:///{tmp_path / 'q.db'}"
    assert cli.main(["db", "upgrade", "--db", sqlite_url]) == 0
    assert f"no schema -> schema version {SQLITE_VERSION}" in capsys.readouterr().out


def test_an_unreachable_database_is_503_and_its_password_is_never_shown() -> None:
    with pytest.raises(DatabaseUnavailable) as info:
        open_queue("postgresql://lab:s3cret@127.0.0.1:1/fleet")
    assert info.value.status == 503
    assert "s3cret" not in info.value.message and "127.0.0.1:1/fleet" in info.value.message


# -- several receivers on one database ---------------------------------------


def test_a_reload_through_one_receiver_is_seen_by_another(url: str) -> None:
    one, two = PostgresQueue(url), PostgresQueue(url)
    first = manifest.loads(manifest_text([job("g"), job("m", "mlp")]), source="a.toml")
    one.sync_manifest(first, now=T0)
    claim = two.claim_next("w", cpu("pi"), now=T0)
    assert claim is not None and claim.command == first.trainer.command
    header = manifest_text([]).replace('"trainer.py"', '"train2.py"')
    second = manifest.loads(
        manifest_text([job("g"), job("m", "mlp")], '[hosts.pi]\ndeny_jobs = ["mlp"]\n',
                      header=header), source="b.toml")
    one.sync_manifest(second, now=T0 + 1)
    assert two.claim_next("w", cpu("pi"), now=T0 + 2) is None  # pi may not run mlp now
    claim = two.claim_next("w", cpu("other"), now=T0 + 2)
    assert claim is not None and "train2.py" in claim.command
    one.close()
    two.close()


def test_a_claim_never_goes_by_host_policies_another_receiver_has_replaced(url: str) -> None:
    """A receiver keeps the host policies it last read; each claim checks they are still
    the database's, and claims again under the new ones when a reload changed them."""
    one, two = PostgresQueue(url), PostgresQueue(url)
    denied = '[hosts.pi]\ndeny_jobs = ["mlp"]\n'
    one.sync_manifest(make_manifest([job("m", "mlp"), job("g")], denied), now=T0)
    claim = two.claim_next("w", cpu("pi"), now=T0)  # two reads the policies: pi runs no mlp
    assert claim is not None and claim.job.name == "g"
    assert two.claim_next("w", cpu("pi"), now=T0) is None
    one.sync_manifest(make_manifest([job("m", "mlp"), job("g")],
                                    '[hosts.pi]\nallow_jobs = ["mlp"]\n'), now=T0 + 1)
    claim = two.claim_next("w", cpu("pi"), now=T0 + 2)
    assert claim is not None and claim.job.name == "m"
    [worker] = [w for w in two.workers(now=T0 + 2) if w.worker_id == "w"]
    assert worker.policy.allow == {"mlp"} and worker.policy.deny == set()  # the new ones
    one.sync_manifest(make_manifest([job("m", "mlp"), job("g"), job("m2", "mlp")], denied),
                      now=T0 + 3)
    assert two.claim_next("w", cpu("pi"), now=T0 + 4) is None  # denied again
    one.close()
    two.close()


def test_sweeps_from_several_receivers_at_once_sweep_each_job_once(url: str) -> None:
    queues = [PostgresQueue(url) for _ in range(4)]
    queues[0].sync_manifest(make_manifest([job(f"j{i}", seed=i) for i in range(200)]), now=T0)
    for _ in range(200):
        assert queues[0].claim_next("w", cpu(), now=T0) is not None
    results: list[list[str]] = [[] for _ in queues]
    barrier = threading.Barrier(len(queues))

    def sweep(i: int) -> None:
        barrier.wait()
        results[i] = queues[i].sweep_stale(now=T0 + 700)

    threads = [threading.Thread(target=sweep, args=(i,)) for i in range(len(queues))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    swept = [job_id for found in results for job_id in found]
    assert len(swept) == 200 and len(set(swept)) == 200
    q = queues[0]
    for j in q.list_jobs():
        assert j.status == Status.PENDING and j.lost_count == 1
        assert [e.kind for e in q.history(j.job_id)].count("failed") == 1
        assert [a.outcome for a in q.attempts(j.job_id)] == ["lost_worker"]
    assert q.sweep_stale(now=T0 + 701) == []
    for queue in queues:
        queue.close()


# -- trainfleet db migrate ---------------------------------------------------


def _busy_lab(path: Path) -> tuple[SqliteQueue, dict[str, str]]:
    """A SQLite queue with jobs in every state, workers, tokens and history."""
    q = SqliteQueue(path)
    names = ["done", "failed", "cancelled", "running", "claimed", "pending", "orphan", "gpu"]
    jobs = [job(n, hyper={"lr": 0.1 * i, "n": i}) for i, n in enumerate(names[:-1])]
    jobs.append(job("gpu", "transformer", require_cuda=True, min_vram_gib=8.0,
                    allowed_hosts=["gpu-a"], train_hosts=["x", "y"], split_recipe="by-day"))
    q.sync_manifest(make_manifest(jobs, '[hosts.pi]\ndeny_jobs = ["gbt"]\n'), now=T0)
    leases = {}
    for n in names[:5]:
        claim = q.claim_next(f"w-{n}", cpu(f"h-{n}"), now=T0 + 1)
        assert claim is not None and claim.job.name == n
        leases[n] = claim.lease
        q.heartbeat(claim.job.job_id, claim.lease, {"fraction": 0.5, "message": "é"}, "tail",
                    now=T0 + 2)
    ids = {j.name: j.job_id for j in q.list_jobs()}
    q.complete(ids["done"], leases["done"], "a" * 64, {"acc": 0.97}, now=T0 + 3)
    q.fail(ids["failed"], leases["failed"], "boom", retryable=False, now=T0 + 3)
    q.cancel(ids["cancelled"], now=T0 + 3)
    q.sync_manifest(make_manifest([j for j in jobs if j["name"] != "orphan"]), now=T0 + 4)
    q.claim_next("w-gpu", gpu("gpu-a"), now=T0 + 5)
    q.sweep_stale(now=T0 + 5000)
    q.create_token("gpu-a", TokenKind.WORKER, hash_token("tfw_a"), now=T0)
    q.create_token("h-x", TokenKind.ENROLL, hash_token("tfe_x"), expires_at=T0 + 60, now=T0)
    return q, leases


def test_migrate_moves_every_row_and_every_job_compares_equal(
    url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source, _ = _busy_lab(tmp_path / "old.db")
    assert cli.main(["db", "migrate", "--from", f"sqlite:///{tmp_path / 'old.db'}",
                     "--to", url]) == 0
    out = capsys.readouterr().out
    assert "8 jobs compared one by one: identical" in out
    target = open_queue(url)
    assert target.counts() == source.counts()
    for j in source.list_jobs():
        assert target.get(j.job_id).to_dict() == j.to_dict()
        assert target.history(j.job_id) == source.history(j.job_id)
        assert target.attempts(j.job_id) == source.attempts(j.job_id)
        assert target.log_tail(j.job_id) == source.log_tail(j.job_id)
    assert [w.to_dict() for w in target.workers(now=T0)] == \
        [w.to_dict() for w in source.workers(now=T0)]
    assert target.list_tokens() == source.list_tokens()
    new = target.sync_manifest(make_manifest([job("later")]), now=T0 + 6000)
    assert new.added == 1  # the event ids carry on past the copied ones
    target.close()
    source.close()


def test_migrated_live_jobs_keep_their_leases(url: str, tmp_path: Path) -> None:
    source = SqliteQueue(tmp_path / "old.db")
    source.sync_manifest(make_manifest([job("a"), job("b")]), now=T0)
    claims = [source.claim_next("w", cpu(), now=T0) for _ in range(2)]
    source.close()
    assert cli.main(["db", "migrate", "--from", str(tmp_path / "old.db"), "--to", url]) == 0
    target = open_queue(url)
    a, b = claims
    assert a is not None and b is not None
    assert target.heartbeat(a.job.job_id, a.lease) == "continue"
    assert target.complete(b.job.job_id, b.lease, "c" * 64).status == Status.COMPLETED
    assert target.fail(a.job.job_id, a.lease, "x", kind=FailureKind.WORKER_SHUTDOWN).status \
        == Status.PENDING
    target.close()


def test_migrate_refuses_a_database_that_already_holds_jobs(url: str, tmp_path: Path) -> None:
    SqliteQueue(tmp_path / "old.db").close()
    target = open_queue(url)
    target.sync_manifest(make_manifest([job("a")]), now=T0)
    target.close()
    with pytest.raises(TrainfleetError, match="already holds events, jobs"):
        migrate(str(tmp_path / "old.db"), url)
