"""HTTP API and web page for a trained T2L run: ``create_app(runtime)`` and ``t2l serve``."""

from t2l_framework.serve.app import create_app

__all__ = ["create_app"]
