"""`melanoma serve`: a local web page and JSON API to try a checkpoint on a few photos.

Importing this package costs nothing: FastAPI (the `serve` extra) and the model are loaded only
when `create_app` is called, so `melanoma predict` works without the extra installed.
"""

from __future__ import annotations

import logging
import os
import sys

from melanoma.serve.limits import DEFAULT_HOST, DEFAULT_PORT, LOOPBACK_HOSTS, ServeLimits

__all__ = ["ServeLimits", "create_app", "run_server"]

log = logging.getLogger(__name__)


def create_app(*args, **kwargs):
    """The FastAPI application; see melanoma.serve.app.create_app."""
    from melanoma.serve.app import create_app as _create_app

    return _create_app(*args, **kwargs)


def run_server(checkpoint: str | os.PathLike, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
               head: str | None = None, device: str = "cpu", limits: ServeLimits | None = None,
               quiet: bool = False) -> None:
    """`melanoma serve`: load the checkpoint, then serve until Ctrl+C."""
    try:  # checked before the model loads
        import fastapi  # noqa: F401
        import python_multipart  # noqa: F401
        import uvicorn
    except ImportError as e:
        raise RuntimeError(f"`melanoma serve` needs the serve extra ({e.name} is not installed): "
                           f"pip install 'melanoma[serve]' (or -e '.[serve]' in a clone)") from None
    app = create_app(checkpoint, head=head, device=device, limits=limits)
    if host not in LOOPBACK_HOSTS:
        log.warning("listening on %s: anyone who can reach this machine on port %d can upload images and "
                    "use the model (no authentication, no encryption)", host, port)
    print(f"melanoma serve: {checkpoint} (head {app.state.service.default_head}) on http://{host}:{port}/ "
          f"(Ctrl+C stops it). A research tool, not a diagnosis.", file=sys.stderr)
    uvicorn.run(app, host=host, port=port, log_level="warning" if quiet else "info")
