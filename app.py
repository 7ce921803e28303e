"""Distillation Studio: ``python app.py`` serves the studio on the embedded models.

Also the Hugging Face Spaces entry point (the README's header names this file).
"""

from __future__ import annotations

import argparse
import errno
import os
import socket
import sys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Distillation Studio")
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                        help="address to listen on (0.0.0.0 to serve other machines)")
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)))
    parser.add_argument("--share", action="store_true", help="also open a public gradio.live link")
    parser.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cuda, cuda:1, mps or cpu")
    parser.add_argument("--concurrency", type=int, default=1,
                        help="how many heavy (model) events run at once on the device")
    parser.add_argument("--model", action="append", default=[], metavar="FOLDER",
                        help="also serve this local model folder (diffusers, open_clip, StyleGAN2 "
                             "folder or .pkl); repeatable")
    parser.add_argument("--hub-model", action="append", default=[], metavar="REPO_ID",
                        help="also offer this hub text-to-image model (needs a network or the local "
                             "Hugging Face cache); repeatable")
    parser.add_argument("--runs-dir", default="runs", help="finished training runs found here are served too")
    parser.add_argument("--no-train", action="store_true", help="hide training: the Distill / train tab says it is off")
    args = parser.parse_args(argv)
    if not 0 < args.port < 65536:
        parser.error(f"--port must be 1-65535, got {args.port}")
    return args


def port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError as exc:
            return exc.errno in (errno.EADDRINUSE, errno.EACCES)
    return False


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if port_in_use(args.host, args.port):
        print(f"error: port {args.port} on {args.host} is already in use; stop the other server or "
              f"choose another port with --port", file=sys.stderr)
        return 2
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from studio import build_app  # imported late: argument errors answer at once
    from studio.registry import add_hub, add_local, default_registry

    try:
        registry = default_registry(args.device, runs_dir=args.runs_dir)
        for folder in args.model:
            add_local(registry, folder)
        for repo_id in args.hub_model:
            add_hub(registry, repo_id)
        demo = build_app(registry=registry, runs_dir=args.runs_dir, allow_training=not args.no_train)
    except ValueError as exc:  # --device cuda without one, a folder that is not a model, ...
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"Distillation Studio on {demo.registry.device}; open http://{args.host}:{args.port}", flush=True)
    demo.queue(default_concurrency_limit=args.concurrency).launch(
        server_name=args.host, server_port=args.port, share=args.share, show_error=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
