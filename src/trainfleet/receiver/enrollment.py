"""Enrolling hosts: the operator mints, lists and revokes per-host tokens; a host trades a
one-time enrollment code for its worker token. The receiver stores only sha256 hashes."""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import APIRouter
from fastapi import Path as PathParam

from trainfleet.queue.base import TokenInfo
from trainfleet.receiver import schemas as s
from trainfleet.receiver.routes import ERRORS, OperatorAuth, State
from trainfleet.tokens import DEFAULT_ENROLL_TTL_S, TokenKind, hash_token, new_token, token_id

log = logging.getLogger("trainfleet.receiver")
router = APIRouter()


def _out(info: TokenInfo, now: float) -> s.TokenOut:
    return s.TokenOut(**info.to_dict(now))


@router.post("/v1/tokens", dependencies=OperatorAuth, status_code=201, responses=ERRORS)
async def create_token(body: s.TokenCreateRequest, state: State) -> s.TokenCreatedOut:
    """Mint a worker token for a host, or (enroll) a one-time code that expires after ttl_s."""
    now = state.now()
    kind = TokenKind.ENROLL if body.enroll else TokenKind.WORKER
    ttl_s = body.ttl_s if body.ttl_s is not None or not body.enroll else DEFAULT_ENROLL_TTL_S
    token = new_token(kind)
    info = state.queue.create_token(body.hostname, kind, hash_token(token),
                                    None if ttl_s is None else now + ttl_s, state.queue_now())
    what = "enrollment code" if body.enroll else "worker token"
    log.info("%s for host %s created (id %s)", what, body.hostname, token_id(info.token_hash))
    return s.TokenCreatedOut(**info.to_dict(now), token=token)


@router.get("/v1/tokens", dependencies=OperatorAuth, responses=ERRORS)
async def list_tokens(state: State) -> s.TokensOut:
    """Every token and code with its host, kind, creation, expiry, last use and revocation."""
    now = state.now()
    return s.TokensOut(tokens=[_out(info, now) for info in state.queue.list_tokens()])


@router.post("/v1/tokens/{hostname}/revoke", dependencies=OperatorAuth, responses=ERRORS)
async def revoke_host(
    hostname: Annotated[str, PathParam(min_length=1, max_length=253)], state: State
) -> s.RevokeOut:
    """Refuse the host from now on; its running jobs are requeued like a lost worker's."""
    result = state.queue.revoke_host(hostname, state.queue_now())
    log.warning("host %s revoked: %d token(s); requeued %d job(s)", hostname, result.revoked,
                len(result.requeued))
    return s.RevokeOut(hostname=result.hostname, revoked=result.revoked,
                       requeued=list(result.requeued))


@router.post("/v1/enroll", responses=ERRORS)
async def enroll(body: s.EnrollRequest, state: State) -> s.EnrollOut:
    """Trade a one-time enrollment code for its host's worker token (no other credential)."""
    token = new_token(TokenKind.WORKER)
    info = state.queue.redeem_enroll_code(hash_token(body.code), body.hostname,
                                          hash_token(token), state.queue_now())
    log.info("host %s enrolled (token id %s)", body.hostname, token_id(info.token_hash))
    return s.EnrollOut(token=token, hostname=info.hostname, token_id=token_id(info.token_hash))
