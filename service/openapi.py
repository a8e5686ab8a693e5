"""The OpenAPI schema as the server enforces it: the request bodies (a multipart form with RequestParams' fields,
or the raw bytes), the error replies, and the service's caps stamped on the generated schema."""

from __future__ import annotations

from .config import MAX_FRAME_STRIDE
from .params import RequestParams
from .schemas import ErrorResponse
from .state import AppState

ERRORS = {code: {"model": ErrorResponse} for code in (400, 403, 404, 408, 413, 415, 422, 500, 503, 504)}


def form_properties() -> dict:
    """The multipart form's fields in the OpenAPI schema: ``file`` and RequestParams' fields."""
    def present(prop: dict) -> dict:  # a form field is sent or left out, never null
        value = next(p for p in prop.get("anyOf", [prop]) if p.get("type") != "null")
        return {**{k: v for k, v in prop.items() if k not in ("anyOf", "default")}, **value}

    properties = RequestParams.model_json_schema()["properties"]
    return {"file": {"type": "string", "format": "binary"}, **{name: present(p) for name, p in properties.items()}}


def request_body(description: str, media: list[str], extra_fields: dict | None = None) -> dict:
    """A route's ``openapi_extra``: the multipart form (``file``, the run parameters, ``extra_fields``) or the raw
    bytes of one of ``media``."""
    form = {"type": "object", "properties": {**form_properties(), **(extra_fields or {})}, "required": ["file"],
            "additionalProperties": False}
    content = {"multipart/form-data": {"schema": form},
               **{m: {"schema": {"type": "string", "format": "binary"}} for m in media}}
    return {"requestBody": {"required": True, "description": description, "content": content}}


IMAGE_BODY = request_body("the image: multipart field `file`, or the raw bytes with an image content type",
                          ["image/jpeg", "image/png", "image/webp", "image/bmp"])
VIDEO_BODY = request_body("the video (MP4/MOV, AVI, Matroska/WebM): multipart field `file`, or the raw bytes "
                          "(video/*, application/octet-stream)",
                          ["video/mp4", "video/x-msvideo", "application/octet-stream"],
                          {"every": {"type": "integer", "minimum": 1, "maximum": MAX_FRAME_STRIDE}})


def sleep_pattern(max_sleep: int) -> str:
    """The regular expression of ``sleep``: 'auto' or an integer 0..``max_sleep``."""
    return "^(auto|" + "|".join(str(n) for n in range(int(max_sleep) + 1)) + ")$"


def state_bounds(schema: dict, caps: dict[str, int]) -> dict:
    """The OpenAPI ``schema`` with the caps the server enforces (``Settings.caps``; the generated schema has the
    declaration's bounds, which no cap is wider than) on the query parameters and the form fields, sleep as a
    pattern of 0..cap; and the response models' ``$defs`` moved to ``components/schemas`` so that every ``$ref``
    resolves."""
    components = schema.setdefault("components", {}).setdefault("schemas", {})

    def bound(name: str, node: dict) -> None:
        for part in [node, *node.get("anyOf", [])]:
            if name == "sleep" and part.get("type") == "string":
                part["pattern"] = sleep_pattern(caps["sleep"])
            elif name in caps and part.get("type") in ("integer", "number"):
                part["maximum"] = caps[name]

    def walk(node):
        if isinstance(node, dict):
            components.update(node.pop("$defs", {}))
            for key, value in node.items():
                if key == "$ref" and isinstance(value, str) and value.startswith("#/$defs/"):
                    node[key] = "#/components/schemas/" + value[len("#/$defs/"):]
                else:
                    walk(value)
            if node.get("in") == "query" and "schema" in node:
                bound(node.get("name", ""), node["schema"])
            for name, prop in (node.get("properties") or {}).items():
                if isinstance(prop, dict) and "file" in node.get("properties", {}):
                    bound(name, prop)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(schema)
    return schema


def install_openapi(app, state: AppState) -> None:
    """``app.openapi`` generates the schema on first use (the models are loaded by then: the caps of wake and
    burst depend on their levels) with the caps stated."""
    generate = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            app.openapi_schema = state_bounds(generate(), state.caps())
        return app.openapi_schema

    app.openapi = openapi
