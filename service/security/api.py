"""The authorization server's HTTP side: `POST /auth/token`, SMART discovery, the server's JWKS.

Routes parse the form, call `TokenService.issue` and shape the OAuth 2.0 answer (RFC 6749 5.1 and
5.2: `Cache-Control: no-store`, errors as `{"error": ..., "error_description": ...}`).
"""

from __future__ import annotations

from typing import Annotated, Any
from urllib.parse import parse_qsl

import orjson
from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from starlette.responses import Response

from service.bootstrap import Services
from service.security.authorization import CLIENT_ALGORITHMS, OAuthError
from service.security.scopes import API_AREAS, AUDIT_TYPE

_NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}


async def _services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(_services)]


def _base(request: Request, services: Services) -> str:
    configured = services.settings.public_base_url
    return (configured or str(request.base_url)).rstrip("/")


def token_url(request: Request, services: Services) -> str:
    """The URL client assertions must name as their audience."""
    return f"{_base(request, services)}/auth/token"


def supported_scopes() -> list[str]:
    from service.fhir.api import STORED_TYPES

    scopes = ["system/*.read", "system/*.write", "system/*.cruds", "system/*.rs"]
    scopes += [f"system/{t}.rs" for t in STORED_TYPES if t != AUDIT_TYPE]
    scopes += [f"system/{AUDIT_TYPE}.rs"]
    scopes += [f"system/{area}.{action}" for area in API_AREAS for action in ("read", "write")]
    return scopes


def smart_configuration(base: str) -> dict[str, Any]:
    return {
        "issuer": base,
        "jwks_uri": f"{base}/auth/jwks",
        "token_endpoint": f"{base}/auth/token",
        "token_endpoint_auth_methods_supported": ["private_key_jwt"],
        "token_endpoint_auth_signing_alg_values_supported": list(CLIENT_ALGORITHMS),
        "grant_types_supported": ["client_credentials"],
        "scopes_supported": supported_scopes(),
        "response_types_supported": ["token"],
        "capabilities": ["client-confidential-asymmetric", "permission-v1", "permission-v2"],
    }


def rest_security(base: str) -> dict[str, Any]:
    """CapabilityStatement.rest.security: SMART on FHIR, with the token endpoint's URL."""
    return {
        "extension": [
            {
                "url": "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris",
                "extension": [{"url": "token", "valueUri": f"{base}/auth/token"}],
            }
        ],
        "service": [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/restful-security-service",
                        "code": "SMART-on-FHIR",
                    }
                ]
            }
        ],
        "description": "SMART Backend Services: client_credentials with a private_key_jwt "
        "assertion (RS384 or ES384) at the token endpoint; bearer access tokens.",
    }


def build_auth_router() -> APIRouter:
    router = APIRouter(tags=["security"])

    @router.post(
        "/auth/token",
        summary="SMART Backend Services token endpoint (client_credentials, private_key_jwt)",
        response_class=Response,
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "application/x-www-form-urlencoded": {
                        "schema": {
                            "type": "object",
                            "properties": {
                                "grant_type": {"type": "string"},
                                "scope": {"type": "string"},
                                "client_assertion_type": {"type": "string"},
                                "client_assertion": {"type": "string"},
                            },
                        }
                    }
                },
            },
            "responses": {
                "200": {"description": "An access token"},
                "400": {"description": "An OAuth 2.0 error"},
                "401": {"description": "invalid_client"},
            },
        },
    )
    async def token(request: Request, services: ServicesDep) -> Response:
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        raw = (await request.body()).decode("utf-8", errors="replace")
        form = dict(parse_qsl(raw, keep_blank_values=True))
        url = token_url(request, services)
        try:
            if content_type != "application/x-www-form-urlencoded":
                raise OAuthError(
                    "invalid_request", "send the form as application/x-www-form-urlencoded"
                )
            answer = await run_in_threadpool(
                lambda: services.security.tokens.issue(form=form, token_url=url)
            )
        except OAuthError as error:
            status = 401 if error.error == "invalid_client" else error.status
            return Response(
                orjson.dumps(error.as_json()),
                status_code=status,
                media_type="application/json",
                headers=_NO_STORE,
            )
        return Response(orjson.dumps(answer), media_type="application/json", headers=_NO_STORE)

    @router.get("/auth/jwks", summary="The public keys that sign this server's access tokens")
    async def jwks(services: ServicesDep) -> dict[str, Any]:
        key = await run_in_threadpool(services.security.keys.get)
        return {"keys": [key.public_jwk]}

    @router.get(
        "/fhir/.well-known/smart-configuration",
        summary="SMART discovery: the token endpoint, its methods, algorithms and scopes",
    )
    async def smart(request: Request, services: ServicesDep) -> dict[str, Any]:
        return smart_configuration(_base(request, services))

    return router
