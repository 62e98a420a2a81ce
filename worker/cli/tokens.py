"""``quarry tokens``: API tokens (stored hashed; the secret is shown once)."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from worker.cli import console as view
from worker.cli.common import (
    UsageError,
    err,
    fail,
    open_store,
    out,
    print_json,
)
from worker.store.tokens import valid_scope

app = typer.Typer(
    rich_markup_mode=None,
    help="API tokens (stored hashed; the secret is shown once).",
    no_args_is_help=True,
)


_SCOPE_HELP = "operator, read, or gateway:NAME"


def _check_scope(scope: str) -> str:
    if valid_scope(scope):
        return scope
    msg = f"--scope: expected {_SCOPE_HELP}; got {scope!r}"
    raise UsageError(msg)


@app.command("create")
def tokens_create(
    scope: Annotated[str, typer.Option(metavar="SCOPE", help=_SCOPE_HELP)],
    name: Annotated[str, typer.Option(metavar="NAME", help="A label for people.")] = "",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Create a token and print its secret (once: only its hash is stored)."""
    token, secret = open_store().create_token(_check_scope(scope), name)
    if as_json:
        record = {"id": token.id, "scope": token.scope, "name": token.name, "token": secret}
        print(json.dumps(record))  # noqa: T201 - the one place a secret is meant for stdout
        return
    err.print(f"created {token.id} ({token.scope}); the secret below is shown only now:")
    print(secret)  # noqa: T201 - the one place a secret is meant for stdout


@app.command("list")
def tokens_list(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List tokens (never their secrets)."""
    tokens = open_store().list_tokens()
    rows: list[dict[str, Any]] = [
        {
            "id": t.id,
            "name": t.name,
            "scope": t.scope,
            "created_at": t.created_at.isoformat(),
            "revoked_at": t.revoked_at.isoformat() if t.revoked_at else None,
        }
        for t in tokens
    ]
    if as_json:
        print_json(rows)
        return
    out.print(
        view.plain_table(
            ("id", "scope", "name", "created", "revoked"),
            [
                (r["id"], r["scope"], str(r["name"]), r["created_at"], r["revoked_at"] or "-")
                for r in rows
            ],
            width=out.width,
        )
    )


@app.command("revoke")
def tokens_revoke(token_id: Annotated[str, typer.Argument(metavar="TOKEN_ID")]) -> None:
    """Revoke a token; it stops working at once."""
    if not open_store().revoke_token(token_id):
        fail(f"no live token {token_id}")
    out.print(f"revoked {token_id}")
