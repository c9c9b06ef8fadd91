"""The `rlp-jax` command line. Each subcommand imports only what it needs."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


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


def _fail(command: str, error: Exception) -> int:
    print(f"rlp-jax {command}: {error}", file=sys.stderr)
    return 2


def _train(args: argparse.Namespace) -> int:
    from rlp_jax import config as config_lib
    from rlp_jax import trainer

    try:
        config = config_lib.load_config(args.config, args.overrides)
        trainer.train(config, args.workdir)
    except (config_lib.ConfigError, FileNotFoundError) as error:
        return _fail("train", error)
    except trainer.TrainingError as error:
        print(f"rlp-jax train: {error}", file=sys.stderr)
        return 1
    return 0


def _demo(args: argparse.Namespace) -> int:
    from rlp_jax import demo

    demo.run_demo(args.workdir, warmup_steps=args.warmup_steps, rlp_steps=args.steps,
                  eval_positions=args.eval_positions)
    return 0


def _export(args: argparse.Namespace) -> int:
    from rlp_jax import build
    from rlp_jax import config as config_lib
    from rlp_jax.models import hf

    try:
        model = build.model_from_run(args.workdir)
    except config_lib.ConfigError as error:
        return _fail("export", error)
    out = hf.save_hf(model, args.out, dtype=args.dtype)
    print(f"wrote an HF folder (config.json + safetensors) to {out}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    import json

    from rlp_jax import config as config_lib
    from rlp_jax import evaluation_run

    try:
        config = config_lib.load_config(args.config, []) if args.config else None
        result = evaluation_run.evaluate_run(args.workdir, args.hf, config=config, start_from=args.start_from,
                                             num_positions=args.positions)
    except (config_lib.ConfigError, FileNotFoundError) as error:
        return _fail("eval", error)
    out = args.out or (args.workdir and f"{args.workdir}/eval_final") or "eval_final"
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out + ".json").write_text(json.dumps(result, indent=2))
    markdown = evaluation_run.to_markdown(result, f"rlp-jax eval: {args.workdir or args.hf}")
    Path(out + ".md").write_text(markdown)
    print(markdown)
    return 0


def _ablate(args: argparse.Namespace) -> int:
    from rlp_jax import ablate

    seeds = tuple(range(args.seeds))
    try:
        ablate.run_grid(args.grid, args.workdir, seeds=seeds, steps=args.steps, warmup_steps=args.warmup_steps,
                        eval_positions=args.eval_positions)
    except ValueError as error:
        return _fail("ablate", error)
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
    train = commands.add_parser(
        "train", help="train with a config file (ml_collections); rerun to resume",
        description="rlp-jax train --config configs/X.py --workdir DIR [--config.a.b=value ...]")
    train.add_argument("--config", default="demo",
                       help="config .py with get_config(), or a bundled config's name (default: demo, the demo's "
                            "RLP stage)")
    train.add_argument("--workdir", required=True, help="checkpoints, metrics and exports go here")
    train.set_defaults(run=_train)

    demo = commands.add_parser("demo", help="the bundled CPU demo: warm-up, RLP, report (minutes)")
    demo.add_argument("--workdir", default="rlp_demo_run", help="where the demo writes (default: ./rlp_demo_run)")
    demo.add_argument("--steps", type=int, default=None, help="RLP steps (default 300)")
    demo.add_argument("--warmup-steps", type=int, default=None, help="NTP warm-up steps (default 150)")
    demo.add_argument("--eval-positions", type=int, default=None, help="held-out positions (default 512)")
    demo.set_defaults(run=_demo)

    export = commands.add_parser("export", help="a run's latest weights as an HF folder")
    export.add_argument("--workdir", required=True)
    export.add_argument("--out", required=True)
    export.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    export.set_defaults(run=_export)

    ev = commands.add_parser("eval", help="evaluate a run (or an HF folder) on held-out positions")
    ev.add_argument("--workdir", default=None, help="a training run's workdir")
    ev.add_argument("--hf", default=None, help="an HF folder instead of a run (needs --config)")
    ev.add_argument("--config", default=None, help="config for tokenizer and data (default: the run's)")
    ev.add_argument("--start-from", default=None, help="a run whose final weights are the 'start' baseline")
    ev.add_argument("--positions", type=int, default=None, help="held-out positions (default: config)")
    ev.add_argument("--out", default=None, help="output path prefix for .json and .md")
    ev.set_defaults(run=_eval)

    ab = commands.add_parser("ablate", help="the paper's ablations at toy scale on the demo task")
    ab.add_argument("--grid", required=True, help="reward | rollouts | thought_len | kl | cpt")
    ab.add_argument("--workdir", required=True)
    ab.add_argument("--seeds", type=int, default=2, help="seeds per cell (default 2)")
    ab.add_argument("--steps", type=int, default=None, help="RLP steps per cell (default: the demo's)")
    ab.add_argument("--warmup-steps", type=int, default=None)
    ab.add_argument("--eval-positions", type=int, default=None)
    ab.set_defaults(run=_ablate)

    from rlp_jax import plan

    plan.register(commands)

    from rlp_jax import bench

    bench.register(commands)

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
    argv = list(sys.argv[1:] if argv is None else argv)
    # ml_collections-style overrides (--config.a.b=value) are collected before argparse sees them.
    overrides = [a.removeprefix("--config.") for a in argv if a.startswith("--config.")]
    argv = [a for a in argv if not a.startswith("--config.")]
    args = build_parser().parse_args(argv)
    if overrides and args.command not in ("train", "plan"):
        print(f"rlp-jax {args.command}: --config.* overrides apply to 'train' and 'plan' only.", file=sys.stderr)
        return 2
    args.overrides = overrides
    if args.command != "plan":  # multi-host runs: jax.distributed from the environment (launch/)
        from rlp_jax import distributed

        try:
            distributed.maybe_initialize_from_env()
        except distributed.DistributedConfigError as error:
            return _fail(args.command, error)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
