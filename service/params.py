"""A request's run parameters: the query string and form fields of the detection endpoints, generated from the
library's one declaration (``detector.options``: ``Schedule`` and ``Selection``), and the service's narrower caps
(``Settings.caps``) enforced on them (``service/openapi.py`` states them in the schema).

    query dependency (``detect_query``) / form fields -> ``RequestParams`` (declared bounds) -> ``to_params``
    (the caps of the model asked for) -> ``Params``
"""

from __future__ import annotations

import inspect
from typing import Optional

from fastapi import Query
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, Field, ValidationError, create_model

from detector.options import AUTO, Schedule, Selection, options_of, parse_value

from .backends import Backend, Params
from .config import Settings
from .errors import ServiceError

# the service takes every run parameter but the class filter
DECLARED = {name: declared for name, declared in options_of(Schedule, Selection).items() if name != "classes"}
MODEL_FIELD = dict(description="model name (GET /v1/models); default: the first loaded", max_length=200)


def _field_options(name: str) -> tuple[type, dict]:
    """(value type, pydantic / FastAPI ``Field`` / ``Query`` keywords) of one declared option: the declaration's
    help and bounds; sleep as text, "auto" or a step count (its cap comes from the settings)."""
    bounds = DECLARED[name][1]
    if bounds.auto:
        return str, {"description": bounds.help, "pattern": r"^(auto|[0-9]+)$"}
    limits = {"ge": bounds.minimum, "le": bounds.maximum}
    return bounds.kind, {"description": bounds.help, **{k: v for k, v in limits.items() if v is not None}}


# name -> (value type, the keywords of pydantic's Field and of FastAPI's Query), the model's name first
FIELDS = {"model": (str, MODEL_FIELD), **{name: _field_options(name) for name in DECLARED}}
RequestParams: type[BaseModel] = create_model(
    "RequestParams", **{name: (Optional[kind], Field(None, **options)) for name, (kind, options) in FIELDS.items()})
QUERY_NAMES = set(FIELDS)


def detect_query(**values) -> dict:
    """The detection endpoints' query parameters that were given (a FastAPI dependency)."""
    return {k: v for k, v in values.items() if v is not None}


# FastAPI reads a dependency's parameters from its signature: one Query per field of RequestParams
detect_query.__signature__ = inspect.Signature(
    [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=Optional[kind], default=Query(None, **options))
     for name, (kind, options) in FIELDS.items()], return_annotation=dict)


def validation_detail(error: ValidationError | RequestValidationError) -> str:
    """A validation error as one line: ``name: message; ...`` (no input echoed, no exception text)."""
    parts = []
    for e in error.errors():
        loc = ".".join(str(x) for x in e.get("loc", ()) if x not in ("query", "body"))
        parts.append(f"{loc or 'request'}: {e.get('msg')}")
    return "; ".join(parts) or "invalid request"


def request_values(query: dict, fields: dict) -> RequestParams:
    """The query's values, overridden by the non-empty form fields of the same names, within the declared bounds."""
    values = {**query, **{k: v for k, v in fields.items() if k in QUERY_NAMES and v != ""}}
    try:
        return RequestParams(**values)
    except ValidationError as error:
        raise ServiceError(422, "invalid_parameter", validation_detail(error)) from None


def to_params(request: RequestParams, backend: Backend, settings: Settings) -> Params:
    """The ``Params`` of one request to ``backend``: the declaration's defaults, within the caps of the settings
    (wake and burst by the model's levels; sleep, max_sleep and max_det), and ``max_sleep`` the service's cap."""
    caps = settings.caps(backend.levels)
    if request.wake is not None and request.wake > caps["wake"]:
        raise ServiceError(422, "invalid_parameter", f"wake: at most {caps['wake']} for model {backend.name!r}")
    sleep = parse_value(Schedule, "sleep", request.sleep or AUTO)
    if sleep != AUTO and sleep > caps["sleep"]:
        raise ServiceError(422, "invalid_parameter", f"sleep: 'auto' or an integer 0..{caps['sleep']}")
    for name in ("max_sleep", "max_det"):
        if getattr(request, name) is not None and getattr(request, name) > caps[name]:
            raise ServiceError(422, "invalid_parameter", f"{name}: at most {caps[name]}")
    wake = request.wake or backend.levels
    if request.burst is not None and request.burst > wake:
        raise ServiceError(422, "invalid_parameter", f"burst: 1..{wake} (the wake count)")
    given = request.model_dump(exclude_none=True, exclude={"model"})
    return Params(**{**given, "sleep": sleep, "max_sleep": request.max_sleep or caps["max_sleep"]})
