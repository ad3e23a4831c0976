"""Schemathesis against the receiver's own /openapi.json, with both tokens: no 5xx, no answer
that breaks its declared schema, every check schemathesis has.

The receiver is a real uvicorn on loopback; examples per operation are few (see MAX_EXAMPLES)
so the whole API is covered in well under a minute on a 2-core machine.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import pytest

schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, given, settings  # noqa: E402 - after the skip above
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis.config import SchemathesisConfig  # noqa: E402

from tests.conftest import job, manifest_text  # noqa: E402
from tests.live import serving  # noqa: E402
from trainfleet.receiver import ReceiverSettings  # noqa: E402

WORKER_TOKEN = "fuzz-worker-token"
OPERATOR_TOKEN = "fuzz-operator-token"
READ_TOKEN = "fuzz-read-token"  # the guarded configuration: every declared scheme is enforced
HEADERS = {"X-Worker-Token": WORKER_TOKEN, "X-Operator-Token": OPERATOR_TOKEN,
           "X-Read-Token": READ_TOKEN}
MAX_EXAMPLES = int(os.environ.get("TRAINFLEET_FUZZ_EXAMPLES", "25"))


@pytest.fixture(scope="module")
def receiver_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("fuzz")
    manifest = root / "manifest.toml"
    manifest.write_text(manifest_text([job("alpha"), job("beta", model="mlp"),
                                       job("gamma", model="transformer")]))
    receiver_settings = ReceiverSettings(
        manifest_path=manifest, state_dir=root / "state", operator_token=OPERATOR_TOKEN,
        worker_token=WORKER_TOKEN, read_token=READ_TOKEN, max_upload_bytes=1 << 20,
        max_body_bytes=64 << 10,
        max_log_bytes=64 << 10)
    with ExitStack() as stack:
        host, port = stack.enter_context(serving(receiver_settings))
        yield f"http://{host}:{port}"


MODES = ["positive", "negative"]
# 413 (a body over max_body_bytes) is a refusal too; schemathesis' default list lacks it.
REFUSALS = ["400", "401", "403", "404", "405", "406", "409", "413", "415", "422", "428", "429",
            "5xx"]
CONFIG = {"checks": {"negative_data_rejection": {"expected-statuses": REFUSALS}}}


@pytest.mark.parametrize("mode", MODES)
def test_the_api_keeps_its_own_contract(receiver_url: str, mode: str) -> None:
    """Every operation, each with up to MAX_EXAMPLES generated requests (valid ones, or
    invalid ones that must be refused with a 4xx), checked by every schemathesis check."""
    schema = schemathesis.openapi.from_url(f"{receiver_url}/openapi.json",
                                           config=SchemathesisConfig.from_dict(CONFIG))
    generation_mode = schemathesis.GenerationMode(mode)
    failures: dict[str, str] = {}
    operations = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        operations += 1

        @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck), derandomize=True)
        @given(case=operation.as_strategy(generation_mode=generation_mode))
        def call(case: Any) -> None:
            case.call_and_validate(base_url=receiver_url, headers=HEADERS)

        try:
            call()
        except Unsatisfiable:
            assert mode == "negative"  # an operation without inputs has no invalid request
        except (Exception, BaseExceptionGroup) as exc:  # a FailureGroup naming each check
            failures[operation.label] = str(exc)[:3000]
    assert operations >= 15
    assert not failures, "\n\n".join(f"{label}:\n{text}" for label, text in failures.items())
