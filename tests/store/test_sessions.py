"""Console sessions: exchanged for a token, ended by sign-out, by revoking it, by expiry."""

from __future__ import annotations

from datetime import timedelta

from worker.store import Store
from worker.store.sessions import SESSION_PREFIX


def test_a_session_stands_for_its_token_until_signed_out(store: Store) -> None:
    token, _ = store.create_token("gateway:edge", "edge")
    session, secret = store.create_session(token, timedelta(hours=1))
    assert secret.startswith(SESSION_PREFIX)
    assert session.id != secret  # only the hash is stored
    found = store.get_session(secret)
    assert found is not None
    assert found.token.id == token.id and found.token.gateway == "edge"
    assert found.csrf == session.csrf and len(found.csrf) >= 32
    assert store.end_session(secret) is True
    assert store.get_session(secret) is None
    assert store.end_session(secret) is False


def test_revoking_the_token_ends_every_session_made_from_it(store: Store) -> None:
    token, _ = store.create_token("operator")
    other, _ = store.create_token("read")
    _, first = store.create_session(token, timedelta(hours=1))
    _, second = store.create_session(token, timedelta(hours=1))
    _, kept = store.create_session(other, timedelta(hours=1))
    store.revoke_token(token.id)
    assert store.get_session(first) is None
    assert store.get_session(second) is None
    assert store.get_session(kept) is not None


def test_an_expired_or_forged_session_opens_nothing(store: Store) -> None:
    token, token_secret = store.create_token("operator")
    _, expired = store.create_session(token, timedelta(seconds=-1))
    assert store.get_session(expired) is None
    assert store.get_session(token_secret) is None  # a token is not a session
    assert store.get_session(SESSION_PREFIX + "x" * 43) is None
    assert store.get_session(SESSION_PREFIX + "x" * 500) is None
    # A new session sweeps the expired ones out.
    store.create_session(token, timedelta(hours=1))
    assert store.get_session(expired) is None
