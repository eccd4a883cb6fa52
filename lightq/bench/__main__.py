"""``python -m lightq.bench linear|step [options]`` — see ``lightq.bench.linear`` and ``lightq.bench.step``."""

from __future__ import annotations

import argparse
import sys

from ..errors import LightqError


def _csv(text: str) -> list[str]:
    return [p.strip() for p in text.split(",") if p.strip()]


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m lightq.bench", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    lin = sub.add_parser("linear", help="every available mode at the Wan2.1 linear shapes vs torch bf16")
    lin.add_argument("--shapes", type=_csv, default=["dit14b", "dit1.3b", "t5", "clip"],
                     help="comma-separated subset of dit14b,dit1.3b,t5,clip")
    lin.add_argument("--quick", action="store_true", help="a few shapes per model only")
    stp = sub.add_parser("step", help="one DiT block and one denoising step at 480p per mode")
    stp.add_argument("--models", type=_csv, default=["14b", "1.3b"], help="comma-separated subset of 14b,1.3b")
    stp.add_argument("--layers", type=int, default=None,
                     help="blocks to build (default: 4 for 14B, all 30 for 1.3B); the step is extrapolated")
    stp.add_argument("--profile", action="store_true", help="print a per-op CUDA time breakdown of one block")
    for p in (lin, stp):
        p.add_argument("--modes", type=_csv, default=None,
                       help="comma-separated modes, e.g. fp8-triton,fp8-vllm (default: every installed one)")
        p.add_argument("--iters", type=int, default=20, help="timed calls per measurement (median)")
        p.add_argument("--json", default=None, help="also write the results to this JSON file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    try:
        if args.command == "linear":
            from .linear import run

            run(args.shapes, args.modes, args.iters, args.quick, args.json)
        else:
            from .step import run

            run(args.models, args.modes, args.layers, args.iters, args.profile, args.json)
    except LightqError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
