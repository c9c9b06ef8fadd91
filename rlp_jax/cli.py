"""The `rlp-jax` command line. Each subcommand imports only what it needs."""

from __future__ import annotations

import argparse
import sys


def _info(args: argparse.Namespace) -> int:
    import jax

    import rlp_jax

    print(f"rlp-jax {rlp_jax.__version__}, jax {jax.__version__}")
    print(f"backend {jax.default_backend()}: {jax.device_count()} devices, "
          f"{jax.process_count()} process(es)")
    return 0


def _losses_example(args: argparse.Namespace) -> int:
    from rlp_jax import loss_example

    gains = loss_example.run(steps=args.steps, seed=args.seed)
    first, last = sum(gains[:10]) / 10, sum(gains[-10:]) / 10
    print(f"mean information gain, first 10 steps {first:+.3f} -> last 10 steps {last:+.3f} nats")
    return 0


def _convert(args: argparse.Namespace) -> int:
    from rlp_jax.models import convert, hf

    try:
        if args.from_hf:
            out = convert.hf_to_params(args.from_hf, args.out, param_dtype=args.dtype)
            print(f"wrote rlp-jax params (model_config.json + params/) to {out}")
        else:
            out = convert.params_to_hf(args.to_hf, args.out, dtype=args.dtype)
            print(f"wrote an HF folder (config.json + safetensors) to {out}")
    except (hf.HFFormatError, FileNotFoundError, FileExistsError) as error:
        print(f"rlp-jax convert: {error}", file=sys.stderr)
        return 2
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlp-jax", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    info = commands.add_parser("info", help="print versions and the devices JAX sees")
    info.set_defaults(run=_info)

    example = commands.add_parser(
        "losses-example", help="train a toy thought policy with rlp_jax.losses (seconds, CPU)")
    example.add_argument("--steps", type=int, default=150)
    example.add_argument("--seed", type=int, default=0)
    example.set_defaults(run=_losses_example)
    conv = commands.add_parser(
        "convert", help="HF folder (config.json + safetensors) <-> rlp-jax params folder")
    direction = conv.add_mutually_exclusive_group(required=True)
    direction.add_argument("--from-hf", metavar="HF_DIR", help="read an HF folder, write rlp-jax params")
    direction.add_argument("--to-hf", metavar="PARAMS_DIR", help="read rlp-jax params, write an HF folder")
    conv.add_argument("--out", required=True, help="output folder")
    conv.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                      help="dtype of the written weights")
    conv.set_defaults(run=_convert)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
