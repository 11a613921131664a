"""Command line: ``python -m jodi_core <command> ...``.

Commands import their modules lazily so that ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import logging
import sys


def _cmd_demo(args: argparse.Namespace) -> int:
    from .jobs.demo import run_demo

    run_demo(args.out, device=args.device, steps=args.steps, seed=args.seed)
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from .checkpoint import read_state_dict, weights_file
    from .loading import has_nonfinite, identify_checkpoint

    path = weights_file(args.checkpoint)
    sd = read_state_dict(path)
    kind = identify_checkpoint(sd)
    n = sum(v.numel() for v in sd.values())
    dtypes = sorted({str(v.dtype).replace("torch.", "") for v in sd.values()})
    print(f"{path}: {kind or 'unrecognised'}, {len(sd)} tensors, {n:,} values, dtypes {', '.join(dtypes)}")
    scaled = sum(k.endswith((".scale_weight", ".weight_scale")) for k in sd)
    if scaled:
        print(f"scaled fp8: {scaled} layers with per-tensor scales (loaded as weight * scale)")
    bad = [k for k, v in sd.items() if has_nonfinite(v)]
    if bad:
        print(f"warning: {len(bad)} tensors hold NaN or inf values (the loaders refuse them): {', '.join(bad[:5])}")
    if kind == "jodi":
        from .dit.model import JodiConfig
        from .dit.keys import stored_jodi_settings

        print(JodiConfig.from_state_dict(sd, **stored_jodi_settings(path)))
    elif kind in ("dcae", "dcae-diffusers"):
        from .dcae.model import DCAEConfig
        from .dcae.keys import stored_dcae_settings

        print(DCAEConfig.from_state_dict(sd, **stored_dcae_settings(path)))
    return 0


def _cmd_convert_gemma(args: argparse.Namespace) -> int:
    from .gemma import convert_gemma

    convert_gemma(args.hf_folder, args.out)
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from .jobs.convert import convert

    out = convert(args.input, args.output, args.dtype, layout=args.layout)
    print(f"Wrote {out} ({args.dtype}{', ' + args.layout if args.dtype.startswith('fp8') else ''}).")
    return 0


def _run_train(argv: list[str]) -> int:
    from .jobs.train import main_train

    return main_train(argv) or 0


def _run_annotate(argv: list[str]) -> int:
    from .jobs.annotate import main_annotate

    return main_annotate(argv) or 0


# Commands with their own argument parsers: everything after the command name is theirs.
_PASSTHROUGH = {"train": _run_train, "annotate": _run_annotate}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jodi_core", description=__doc__.splitlines()[0])
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = p.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="joint generation, controllable generation and perception with the demo model")
    demo.add_argument("--out", default="jodi_demo.png", help="where to write the labelled PNG grid")
    demo.add_argument("--device", default="cpu")
    demo.add_argument("--steps", type=int, default=20)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_cmd_demo)

    info = sub.add_parser("info", help="say what a checkpoint file holds and the config inferred from it")
    info.add_argument("checkpoint")
    info.set_defaults(func=_cmd_info)

    gemma = sub.add_parser("convert-gemma", help="merge a Hugging Face gemma-2-2b-it folder into one ComfyUI file")
    gemma.add_argument("hf_folder")
    gemma.add_argument("out")
    gemma.set_defaults(func=_cmd_convert_gemma)

    conv = sub.add_parser("convert", help="rewrite a Jodi DiT, a DC-AE or a Janus folder in fp8, bf16 or fp16")
    conv.add_argument("input", help="DiT or DC-AE file (or DC-AE folder), or Janus model folder")
    conv.add_argument("output", help="a .safetensors file (for Janus: a folder)")
    conv.add_argument("--dtype", required=True, choices=("fp8_e4m3fn", "fp8_e5m2", "bf16", "fp16"))
    conv.add_argument("--layout", default="scaled", choices=("scaled", "plain"),
                      help="fp8 only: per-layer scales (ComfyUI's scaled fp8, the default) or plain casts")
    conv.set_defaults(func=_cmd_convert)

    sub.add_parser("train", help="train or fine-tune a DC-AE and a Jodi DiT (train --help)", add_help=False)
    sub.add_parser("annotate", help="label a folder of images with Jodi perception (annotate --help)", add_help=False)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in _PASSTHROUGH:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
        return _PASSTHROUGH[argv[0]](argv[1:])
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
