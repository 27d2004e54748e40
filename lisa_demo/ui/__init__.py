"""The Gradio front end (the only package, with app.py, that imports gradio)."""

from lisa_demo.ui.app import allowed_paths, build_app
from lisa_demo.ui.settings import AppSettings, default_host

__all__ = ["AppSettings", "allowed_paths", "build_app", "default_host"]
