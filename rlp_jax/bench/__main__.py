"""`python -m rlp_jax.bench [flags]`: the same as `rlp-jax bench [flags]`."""

import argparse
import sys

from rlp_jax import bench


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rlp-jax")
    bench.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["bench", *(sys.argv[1:] if argv is None else argv)])
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
