"""``python -m lightq.bench linear|step|attention|pipeline|parallel|lora [options]`` — see ``lightq.bench.linear``,
``lightq.bench.step``, ``lightq.bench.attention``, ``lightq.bench.pipeline``, ``lightq.bench.parallel`` and
``lightq.bench.lora``."""

from __future__ import annotations

import argparse
import sys

from ..errors import LightqError
from .parallel import DEFAULT_LAYOUTS


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
    stp.add_argument("--attn", type=_csv, default=[],
                     help="attn_quant modes (e.g. int8-sage-triton): each mode's block and step again with that "
                          "self-attention, error also against the same mode with bf16 attention")
    lra = sub.add_parser("lora", help="a rank-r LoRA on one quantized DiT: load merged, block unmerged / merged")
    lra.add_argument("--model", default="14b", choices=["14b", "1.3b"])
    lra.add_argument("--mode", default="fp8-triton+fast_accum", help="the DiT mode, as bench step names it "
                     "(fp8-triton+fast_accum is dit_quant=fp8-triton)")
    lra.add_argument("--rank", type=int, default=64, help="LoRA rank on every block linear")
    lra.add_argument("--layers", type=int, default=2, help="blocks built")
    lra.add_argument("--load-layers", type=int, default=None,
                     help="also time the load without LoRA and merged on a build of this many blocks (40: the whole "
                          "14B DiT; writes it to a temporary file, about 28 GB at 14B)")
    lra.add_argument("--iters", type=int, default=20, help="timed block calls (median)")
    lra.add_argument("--repeat", type=int, default=3, help="loads timed per case (best)")
    lra.add_argument("--json", default=None, help="also write the rows to this JSON file")
    att = sub.add_parser("attention", help="self-attention alone at 14B shapes: every attn_quant mode vs bf16 SDPA")
    att.add_argument("--tokens", type=_csv, default=["480p", "720p"],
                     help="comma-separated token counts or 480p (32760), 720p (75600)")
    att.add_argument("--heads", type=int, default=40, help="attention heads (40: 14B, 12: 1.3B)")
    att.add_argument("--modes", type=_csv, default=None,
                     help="attn_quant modes (default: every installed non-reference one)")
    att.add_argument("--iters", type=int, default=10, help="timed calls per measurement (median)")
    att.add_argument("--check-rows", type=int, default=256, help="query rows checked against float64 attention")
    att.add_argument("--json", default=None, help="also write the rows to this JSON file")
    pip = sub.add_parser("pipeline", help="the user's job (python -m lightq) per mode, each in a fresh process")
    pip.add_argument("overrides", nargs="*", help="overrides common to every job, e.g. model=wan2.1-t2v-14b "
                     "model.weights=random sampler=distill")
    pip.add_argument("--jobs", type=lambda t: [p.strip() for p in t.split(";") if p.strip()], default=[],
                     help="';'-separated jobs after the bf16 one: a DiT mode (fp8-triton) or overrides "
                          "(\"dit_quant=fp8-sgl t5_quant=fp8-sgl\")")
    pip.add_argument("--cache", default="warm", help="cold (empty Triton cache per job), warm (an untimed run "
                     "first), both, or keep (the --work folder's caches as they are)")
    pip.add_argument("--repeat", type=int, default=1, help="timed runs of each job")
    pip.add_argument("--work", default=None, help="folder for the jobs' outputs and caches (./bench-pipeline)")
    pip.add_argument("--json", default=None, help="also write the rows to this JSON file")
    par = sub.add_parser("parallel", help="the user's job on 1 process and per layout on N (torchrun), side by side")
    par.add_argument("overrides", nargs="*", help="overrides common to every job, e.g. model=wan2.1-t2v-14b "
                     "dit_quant=fp8-triton model.height=720 model.width=1280 model.steps=4")
    par.add_argument("--layouts", type=lambda t: [p.strip() for p in t.split(";") if p.strip()],
                     default=DEFAULT_LAYOUTS, help="';'-separated <parallel option>:<processes> [overrides], e.g. "
                     "\"ulysses:4;cfg-ulysses:8 parallel.vae=rank0\" (default: %(default)s)")
    par.add_argument("--cache", default="warm", help="warm (an untimed run of each job first) or keep")
    par.add_argument("--repeat", type=int, default=1, help="timed runs of each job")
    par.add_argument("--work", default=None, help="folder for the jobs' outputs and caches (./bench-parallel)")
    par.add_argument("--json", default=None, help="also write the rows to this JSON file")
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
        elif args.command == "attention":
            from .attention import run

            run(args.tokens, args.heads, args.modes, args.iters, args.check_rows, args.json)
        elif args.command == "lora":
            from .lora import run

            run(args.model, args.mode, args.rank, args.layers, args.iters, args.repeat, args.json, args.load_layers)
        elif args.command == "parallel":
            from .parallel import run

            run(args.layouts, args.overrides, args.cache, args.work, args.json, args.repeat)
        elif args.command == "pipeline":
            from .pipeline import run

            run(args.jobs, args.overrides, args.cache, args.work, args.json, args.repeat)
        else:
            from .step import run

            run(args.models, args.modes, args.layers, args.iters, args.profile, args.json, args.attn)
    except LightqError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
