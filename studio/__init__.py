"""Distillation Studio's Gradio front end. ``build_app()`` makes the Blocks; ``app.py`` launches it."""

from studio.app import build_app, GPU_QUEUE

__all__ = ["build_app", "GPU_QUEUE"]
