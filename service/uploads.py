"""Request bodies: the raw bytes within the size limit and the body deadline (every chunk counted by the byte
budget), and a multipart form's ``file`` part and fields; unknown parameter names refused."""

from __future__ import annotations

import asyncio
import time

from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect, Request

from .errors import ServiceError
from .params import QUERY_NAMES
from .state import AppState


class PartsInMemory(MultiPartParser):
    """Starlette's multipart parser, but a file part stays in memory (counted by the byte budget) instead of
    spilling to a temp file over 1 MB: /tmp is a small emptyDir in deploy/k8s, budgeted for videos only."""

    spool_max_size = 1 << 40


def reject_unknown(names, allowed: set[str], where: str) -> None:
    unknown = sorted(set(names) - allowed)
    if unknown:
        raise ServiceError(422, "invalid_parameter", f"unknown {where} parameter(s): {', '.join(unknown)}; "
                                                     f"accepted: {', '.join(sorted(allowed))}")


def _check_length(request: Request, limit: int) -> None:
    length = request.headers.get("content-length")
    if length is not None:
        try:
            if int(length) > limit:
                raise ServiceError(413, "upload_too_large", f"upload of {length} bytes exceeds the limit of {limit} "
                                                            "bytes")
        except ValueError:
            raise ServiceError(400, "bad_request", "invalid Content-Length") from None


async def read_body(state: AppState, request: Request, held: list[int], deadline: float) -> bytes:
    """The body, within the size limit and the body deadline; its bytes count against the budget."""
    settings, limit = state.settings, state.settings.max_upload_bytes
    _check_length(request, limit)
    chunks, size = [], 0
    body_deadline = time.monotonic() + settings.body_timeout_s
    stream = request.stream().__aiter__()
    try:
        while True:
            try:
                chunk = await asyncio.wait_for(stream.__anext__(), max(0.001, body_deadline - time.monotonic()))
            except StopAsyncIteration:
                break
            size += len(chunk)
            if size > limit:
                raise ServiceError(413, "upload_too_large", f"upload exceeds the limit of {limit} bytes",
                                   {"Connection": "close"})
            held.append(await state.budget.reserve(len(chunk), deadline, in_line=False))
            chunks.append(chunk)
    except asyncio.TimeoutError:
        raise ServiceError(408, "body_timeout", f"the request body did not arrive within {settings.body_timeout_s} s",
                           {"Connection": "close"}) from None
    except ClientDisconnect:
        raise ServiceError(400, "client_disconnected", "the client went away during the upload") from None
    return b"".join(chunks)


async def _form_file(state: AppState, request: Request, body: bytes, what: str, held: list[int], deadline: float,
                     extra_fields: set[str]) -> tuple[bytes, dict]:
    held.append(await state.budget.reserve(len(body), deadline))  # the parsed copy of the file part

    async def parts():
        yield body

    try:
        form = await PartsInMemory(request.headers, parts(), max_files=2, max_fields=20).parse()
    except MultiPartException:
        raise ServiceError(400, "bad_multipart", "the multipart body is malformed (boundary, headers or too many "
                                                 "parts)") from None
    try:
        file = form.get("file")
        if not isinstance(file, UploadFile):
            raise ServiceError(422, "missing_file", f"multipart upload needs a `file` field with the {what}")
        fields = {k: v for k, v in form.items() if isinstance(v, str)}
        reject_unknown(form.keys(), QUERY_NAMES | set(extra_fields) | {"file"}, "form")
        return await file.read(), fields
    finally:
        await form.close()


async def upload(state: AppState, request: Request, raw_types: set[str], what: str, held: list[int],
                 deadline: float, extra_fields: set[str] = frozenset()) -> tuple[bytes, dict]:
    """(bytes, form fields) from a multipart ``file`` field or a raw body of one of ``raw_types``."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    body = await read_body(state, request, held, deadline)
    if content_type == "multipart/form-data":
        return await _form_file(state, request, body, what, held, deadline, extra_fields)
    if not body and content_type in ("", *raw_types):
        raise ServiceError(400, "empty_body", f"no {what} data received")
    if content_type not in raw_types:
        shown = content_type or "none"
        raise ServiceError(415, "unsupported_media_type",
                           f"content type {shown!r}: send multipart/form-data with a `file` field, or the raw "
                           f"{what} with one of: {', '.join(sorted(raw_types))}")
    return body, {}
