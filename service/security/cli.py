"""`infusion-bridge clients ...`: register, list and remove SMART Backend Services clients.

clients add NAME (--jwks FILE | --jwks-url URL) --scope "system/*.read ..."
clients list
clients remove NAME
clients token NAME --key PRIVATE.pem [--scope ...]   an access token, as /auth/token gives
clients demo                                         the demo client and a token for it
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Annotated

import jwt
import orjson
import typer
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from service.bootstrap import Services, bootstrap
from service.security.authorization import ASSERTION_TYPE, OAuthError

clients_app = typer.Typer(help="SMART Backend Services clients.", no_args_is_help=True)

DEMO_CLIENT = "demo"
DEMO_KEY = Path("var/demo-client-key.pem")
DEMO_SCOPE = (
    "system/*.cruds system/AuditEvent.rs system/intake.read system/intake.write "
    "system/sync.read system/sync.write"
)
LOCAL_TOKEN_URL = "urn:infusion-bridge:cli"
"""The audience of the assertions the CLI signs for itself (it calls no URL)."""


def _services() -> Services:
    return bootstrap()


@clients_app.command("add")
def add(
    name: Annotated[str, typer.Argument(help="The client id (the iss and sub it signs).")],
    scope: Annotated[str, typer.Option(help="Space-separated scopes it may be granted.")],
    jwks: Annotated[Path | None, typer.Option(help="A JWK Set file of its public keys.")] = None,
    jwks_url: Annotated[str | None, typer.Option(help="Where it publishes its JWK Set.")] = None,
) -> None:
    """Register a client with its public keys and the scopes it may be granted."""
    services = _services()
    try:
        keys = None if jwks is None else orjson.loads(jwks.read_bytes())
        client = services.security.clients.add(
            client_id=name, scope=scope, jwks=keys, jwks_url=jwks_url
        )
    except (ValueError, OSError) as error:
        typer.secho(str(error), fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None
    finally:
        services.close()
    typer.echo(f"client {client.id} registered with scopes: {client.scope}")


@clients_app.command("list")
def list_clients() -> None:
    """The registered clients, their keys' source and their scopes."""
    services = _services()
    try:
        for client in services.security.clients.list():
            source = (
                client.jwks_url or f"{len(client.jwks.get('keys', []) if client.jwks else [])} keys"
            )
            typer.echo(f"{client.id}\t{source}\t{client.scope}")
    finally:
        services.close()


@clients_app.command("remove")
def remove(name: Annotated[str, typer.Argument(help="The client id.")]) -> None:
    """Remove a client: it gets no new tokens (those issued expire within five minutes)."""
    services = _services()
    try:
        removed = services.security.clients.remove(name)
    finally:
        services.close()
    if not removed:
        typer.secho(f"no client {name}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1)
    typer.echo(f"client {name} removed")


def _assertion(client_id: str, key_pem: bytes, audience: str, kid: str) -> str:
    key = serialization.load_pem_private_key(key_pem, password=None)
    now = int(time.time())
    claims = {"iss": client_id, "sub": client_id, "aud": audience, "exp": now + 240}
    claims |= {"jti": uuid.uuid4().hex, "iat": now}
    alg = "ES384" if isinstance(key, ec.EllipticCurvePrivateKey) else "RS384"
    return jwt.encode(claims, key, algorithm=alg, headers={"kid": kid})  # type: ignore[arg-type]


def _token(services: Services, client_id: str, key_file: Path, scope: str | None) -> str:
    client = services.security.clients.get(client_id)
    if client is None or client.jwks is None:
        raise OAuthError("invalid_client", f"{client_id} is no client registered with inline keys")
    kid = str(client.jwks["keys"][0]["kid"])
    assertion = _assertion(client_id, key_file.read_bytes(), LOCAL_TOKEN_URL, kid)
    answer = services.security.tokens.issue(
        form={
            "grant_type": "client_credentials",
            "scope": scope or client.scope,
            "client_assertion_type": ASSERTION_TYPE,
            "client_assertion": assertion,
        },
        token_url=LOCAL_TOKEN_URL,
    )
    return str(answer["access_token"])


@clients_app.command("token")
def token(
    name: Annotated[str, typer.Argument(help="The client id.")],
    key: Annotated[Path, typer.Option(help="The client's private key (PEM).")],
    scope: Annotated[str | None, typer.Option(help="Scopes wanted; default all it may.")] = None,
) -> None:
    """Print an access token for a client whose private key is at hand (five minutes)."""
    services = _services()
    try:
        typer.echo(_token(services, name, key, scope))
    except (OAuthError, OSError, ValueError) as error:
        typer.secho(str(error), fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from None
    finally:
        services.close()


def public_jwks(private_pem: bytes, kid: str) -> dict[str, object]:
    key = serialization.load_pem_private_key(private_pem, password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    jwk = orjson.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
    return {"keys": [jwk | {"kid": kid, "alg": "ES384", "use": "sig"}]}


@clients_app.command("demo")
def demo(
    key: Annotated[Path, typer.Option(help="Where the demo client's private key is kept.")] = (
        DEMO_KEY
    ),
) -> None:
    """Register the demo client (all scopes) if it is not, and print a token for it."""
    services = _services()
    try:
        if not key.is_file():
            key.parent.mkdir(parents=True, exist_ok=True)
            private = ec.generate_private_key(ec.SECP384R1())
            key.write_bytes(
                private.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
            )
            key.chmod(0o600)
            services.security.clients.remove(DEMO_CLIENT)
        if services.security.clients.get(DEMO_CLIENT) is None:
            services.security.clients.add(
                client_id=DEMO_CLIENT,
                scope=DEMO_SCOPE,
                jwks=public_jwks(key.read_bytes(), "demo-1"),
            )
        access_token = _token(services, DEMO_CLIENT, key, None)
    finally:
        services.close()
    typer.echo(
        f"\nThe demo client '{DEMO_CLIENT}' (private key {key}) may use every scope.\n"
        f"An access token for the next five minutes:\n\n  export TOKEN={access_token}\n\n"
        f"A fresh one:  export TOKEN=$(.venv/bin/infusion-bridge clients token {DEMO_CLIENT} "
        f"--key {key})\n"
        f'Then:         curl -H "Authorization: Bearer $TOKEN" '
        f"http://127.0.0.1:8000/fhir/Patient?_count=2\n"
    )
