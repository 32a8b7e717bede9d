"""The ``mlx-serving`` command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from engine.demo import PRESETS


def _cmd_make_demo(args: argparse.Namespace) -> int:
    if args.vision:
        from engine.demo_vision import make_demo_vision_model

        path = make_demo_vision_model(args.dir, force=args.force)
    else:
        from engine.demo import make_demo_model

        path = make_demo_model(args.dir, args.preset, force=args.force)
    print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mlx-serving", description="Serve MLX models across a fleet of Macs on Ray Serve.")
    sub = p.add_subparsers(dest="command", required=True)

    models = sub.add_parser("models", help="model utilities")
    msub = models.add_subparsers(dest="models_command", required=True)
    demo = msub.add_parser("make-demo", help="build an offline demo model (random weights, real architecture)")
    demo.add_argument("dir", type=Path)
    demo.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    demo.add_argument("--vision", action="store_true", help="build the vision-language demo (qwen2_vl family)")
    demo.add_argument("--force", action="store_true", help="overwrite DIR if it exists")
    demo.set_defaults(func=_cmd_make_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
