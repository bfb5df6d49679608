"""HTTP side of `melanoma serve`: the page, `POST /api/predict`, `GET /api/model`, `GET /healthz`.

Every refusal is JSON `{"error": message, "files": [{"filename", "error"}]}` with a 4xx status,
which the page shows as it is.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from melanoma.serve.engine import ModelService, ServeError, Upload
from melanoma.serve.limits import ServeLimits

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"
FILE_FIELD = "file"
OPTION_FIELDS = ("head", "tta", "overlay")
#: patient-metadata form fields (melanoma.metadata.FIELDS): one value for every image, or one per image in order
METADATA_FIELDS = ("age", "sex", "site")
TRUE_WORDS, FALSE_WORDS = ("1", "true", "yes", "on"), ("", "0", "false", "no", "off")


def create_app(checkpoint: str | os.PathLike, head: str | None = None, device: str = "cpu",
               limits: ServeLimits | None = None) -> FastAPI:
    service = ModelService(checkpoint, head=head, device=device, limits=limits)
    # no /docs: FastAPI's docs page loads its scripts from a CDN, and this server works offline
    app = FastAPI(title="melanoma serve", docs_url=None, redoc_url=None)
    app.state.service = service

    @app.exception_handler(ServeError)
    async def refused(request: Request, e: ServeError):
        log.warning("%s %s refused (%d): %s %s", request.method, request.url.path, e.status, e.message,
                    [f"{f['filename']}: {f['error']}" for f in e.files])
        return JSONResponse({"error": e.message, "files": e.files}, status_code=e.status)

    @app.get("/healthz")
    def healthz():
        return {"status": "ok"}

    @app.get("/api/model")
    def model():
        return {**service.model, "default_head": service.default_head, "overlay_methods": list(service.overlay_methods),
                "default_overlay": service.default_overlay,
                "limits": {"max_files": service.limits.max_files, "max_bytes": service.limits.max_bytes,
                           "max_pixels": service.limits.max_pixels}}

    @app.post("/api/predict")
    async def predict(request: Request):
        uploads, options = await read_upload_form(request, service.limits)
        result = await run_in_threadpool(
            service.predict, uploads, head=options.get("head") or None,
            tta=parse_bool("tta", options.get("tta", "")), overlay=options.get("overlay") or service.default_overlay,
            metadata=options.get("metadata"),
        )
        return result

    @app.get("/", include_in_schema=False)
    def page():
        return FileResponse(STATIC_DIR / "index.html")

    @app.get("/favicon.ico", include_in_schema=False)
    def favicon():  # browsers ask for it whatever the page links
        return FileResponse(STATIC_DIR / "favicon.svg", media_type="image/svg+xml")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


def parse_bool(name: str, value: str) -> bool:
    v = str(value).strip().lower()
    if v in TRUE_WORDS or v in FALSE_WORDS:
        return v in TRUE_WORDS
    raise ServeError(400, f"option {name}={value!r} is not a yes/no value; use one of {TRUE_WORDS + FALSE_WORDS[1:]}")


async def read_upload_form(request: Request, limits: ServeLimits) -> tuple[list[Upload], dict[str, str]]:
    """The `file` parts and the options of a multipart request (options may also be query
    parameters), reading at most `limits.max_bytes` of body."""
    options = {k: v for k, v in request.query_params.items() if k in OPTION_FIELDS}
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        await _read_body(request, limits)  # still bounded
        raise ServeError(400, "no files in the request: send one or more images as multipart/form-data "
                              f"fields named {FILE_FIELD!r}")
    body = await _read_body(request, limits)

    async def replay():
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        # the body is bounded above, so counting files ourselves gives the clearer message
        form = await Request(request.scope, replay).form(max_files=10_000, max_fields=1_000)
    except Exception as e:  # noqa: BLE001 - any parser failure is the client's malformed body
        raise ServeError(400, f"malformed multipart body ({getattr(e, 'detail', e)}); send images as "
                              f"multipart/form-data fields named {FILE_FIELD!r}") from None
    try:
        unknown = sorted(set(form.keys()) - {FILE_FIELD, *OPTION_FIELDS, *METADATA_FIELDS})
        if unknown:
            raise ServeError(400, f"unknown form field(s) {unknown}; expected {FILE_FIELD!r} (one per image) "
                                  f"and options {list(OPTION_FIELDS)}")
        uploads = []
        for item in form.getlist(FILE_FIELD):
            if not isinstance(item, UploadFile):
                raise ServeError(400, f"field {FILE_FIELD!r} must be a file upload, got a text value")
            uploads.append(Upload(filename=item.filename or f"image {len(uploads) + 1}", data=await item.read()))
        for name in OPTION_FIELDS:
            value = form.get(name)
            if isinstance(value, str):
                options[name] = value
        metadata = {f: [v for v in form.getlist(f) if isinstance(v, str)] for f in METADATA_FIELDS if f in form}
        if metadata:
            options["metadata"] = metadata
    finally:
        await form.close()
    return uploads, options


async def _read_body(request: Request, limits: ServeLimits) -> bytes:
    too_large = ServeError(413, f"request body above this server's limit of {limits.max_bytes} bytes; send fewer or "
                                f"smaller images per request, or start the server with --max-bytes")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limits.max_bytes:
        raise too_large  # refused before reading it
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limits.max_bytes:
            raise too_large
    return bytes(body)
