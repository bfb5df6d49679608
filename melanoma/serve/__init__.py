"""`melanoma serve`: a local web page and JSON API to try a checkpoint on a few photos.

Importing this package costs nothing: FastAPI (the `serve` extra) and the model are loaded only
when `create_app` is called, so `melanoma predict` works without the extra installed.
"""

from __future__ import annotations

from melanoma.serve.limits import ServeLimits

__all__ = ["ServeLimits", "create_app"]


def create_app(*args, **kwargs):
    """The FastAPI application; see melanoma.serve.app.create_app."""
    from melanoma.serve.app import create_app as _create_app

    return _create_app(*args, **kwargs)
