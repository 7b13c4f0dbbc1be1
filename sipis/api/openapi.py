"""The OpenAPI 3.1 document the API serves at ``/openapi.json``, built from the schemas."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from sipis import __version__

from .schemas import InstanceIn, InstancePatch

_REF = "#/components/schemas/{model}"


def _error(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }


def _object(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"type": "object"}}},
    }


def _body(model: type[BaseModel]) -> dict[str, Any]:
    return {
        "required": True,
        "content": {"application/json": {"schema": {"$ref": _REF.format(model=model.__name__)}}},
    }


_INSTANCE_ID = {
    "name": "instance_id",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "maxLength": 64},
}
_BEARER: list[dict[str, list[str]]] = [{"instance": []}]
_COMMON_ERRORS = {"400": _error("invalid request"), "413": _error("body too large"),
                  "415": _error("body is not JSON")}  # fmt: skip


def document() -> dict[str, Any]:
    schemas: dict[str, Any] = {}
    for model in (InstanceIn, InstancePatch):
        schema = model.model_json_schema(ref_template=_REF)
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
    schemas["Error"] = {
        "type": "object",
        "required": ["error", "detail"],
        "properties": {
            "error": {"type": "string"},
            "detail": {"type": "string"},
            "field": {"type": "string"},
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "sipis", "version": __version__},
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "instance": {"type": "http", "scheme": "bearer"},
                "admin": {"type": "http", "scheme": "bearer"},
            },
        },
        "paths": {
            "/v1/info": {"get": {"responses": {"200": _object("relay information")}}},
            "/healthz": {"get": {"responses": {"200": _object("alive")}}},
            "/v1/instances": {
                "post": {
                    "requestBody": _body(InstanceIn),
                    "responses": {
                        "201": _object("created; the secret is shown only here"),
                        "429": _error("too many creations from this address"),
                        **_COMMON_ERRORS,
                    },
                }
            },
            "/v1/instances/{instance_id}": {
                "parameters": [_INSTANCE_ID],
                "get": {
                    "security": _BEARER,
                    "responses": {"200": _object("the instance"), "401": _error("unauthorized")},
                },
                "patch": {
                    "security": _BEARER,
                    "requestBody": _body(InstancePatch),
                    "responses": {
                        "200": _object("the changed instance"),
                        "401": _error("unauthorized"),
                        **_COMMON_ERRORS,
                    },
                },
                "delete": {
                    "security": _BEARER,
                    "responses": {"204": {"description": "erased"}, "401": _error("unauthorized")},
                },
            },
            "/v1/stats": {
                "get": {
                    "security": [{"admin": []}],
                    "responses": {"200": _object("counts"), "401": _error("unauthorized")},
                }
            },
            "/metrics": {
                "get": {
                    "security": [{"admin": []}],
                    "responses": {
                        "200": {
                            "description": "Prometheus text exposition format",
                            "content": {"text/plain": {"schema": {"type": "string"}}},
                        },
                        "401": _error("unauthorized"),
                    },
                }
            },
        },
    }
