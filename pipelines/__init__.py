"""Inference and training pipelines, data (the portrait world) and evaluation; no gradio here."""
