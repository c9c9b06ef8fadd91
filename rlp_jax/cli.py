"""The `rlp-jax` command line. Each subcommand imports only what it needs."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from pathlib import Path

DESCRIPTION = """\
rlp-jax: RLP (Reinforcement Learning Pre-training; "RLP: Reinforcement as a Pretraining Objective")
in JAX. The model samples a thought before the next token of ordinary text and is rewarded by how
much the thought raised the likelihood of that token.

  rlp-jax demo                                      the bundled CPU demo (minutes)
  rlp-jax train --corpus my.txt --workdir runs/a    RLP on your own text (rerun to resume)
  rlp-jax train --corpus my.txt --init-from-hf DIR --workdir runs/b
  rlp-jax export --workdir runs/a --out runs/a/hf   the latest weights as an HF folder

Config keys (--config.a.b=value): docs/training.md, or configs/base.py for every key and its default.
Bad input ends in one sentence and exit status 2; --debug (anywhere) also prints the traceback.
"""

EPILOG = "Config keys: docs/training.md (every key and its default: configs/base.py)."


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


_DEBUG = False  # set by --debug: user errors print their traceback too


def _fail(command: str, error: Exception) -> int:
    if _DEBUG:
        traceback.print_exception(error)
    print(f"rlp-jax {command}: {error}", file=sys.stderr)
    return 2


def _train_config(args: argparse.Namespace):
    """The config `train` runs: the file (default: `text` with --corpus, else `demo`), then the
    flags --corpus and --init-from-hf (shorthands for data.corpus, init.* and tokenizer), then
    the --config.* overrides."""
    from rlp_jax import config as config_lib

    name = args.config or ("text" if args.corpus else "demo")
    config = config_lib.load_config(name, [])
    with config.unlocked():
        if args.corpus:
            config.data.corpus = ",".join(args.corpus)
        if args.init_from_hf:
            config.init.kind, config.init.path, config.tokenizer = "hf", args.init_from_hf, args.init_from_hf
    for item in args.overrides:
        config_lib.apply_override(config, item)
    _absolute_paths(config)
    return config


def _absolute_paths(config) -> None:
    """The config's paths made absolute, so that the run (and the workdir's record of it) means the
    same files whatever the working directory of the command that resumes it."""
    d = config.data
    with config.unlocked():
        for node, key in ((d, "corpus"), (d, "validation_corpus")):
            if node[key] and node[key] != "demo":
                node[key] = ",".join(_absolute(p.strip()) for p in node[key].split(",") if p.strip())
        for node, key in ((d, "data_dir"), (config.init, "path"), (config.rlp, "rpt_proxy")):
            if node[key]:
                node[key] = _absolute(node[key])
        if config.eval.benchmark_data_dir:
            config.eval.benchmark_data_dir = _absolute(config.eval.benchmark_data_dir)
        config.eval.benchmark_tasks = tuple(_absolute(t) if t.endswith(".jsonl") else t
                                            for t in config.eval.benchmark_tasks)
        if config.tokenizer not in ("demo", "bytes") and not config.tokenizer.startswith("char:"):
            config.tokenizer = _absolute(config.tokenizer)


def _absolute(path: str) -> str:
    """A path made absolute (a glob keeps its pattern): runs resume from any working directory."""
    return path if Path(path).is_absolute() else os.path.join(os.getcwd(), path)


def _train(args: argparse.Namespace) -> int:
    from rlp_jax import config as config_lib
    from rlp_jax import trainer

    try:
        config = _train_config(args)
        trainer.train(config, args.workdir, force_new=args.force_new, executable=args.executable)
    except (config_lib.ConfigError, FileNotFoundError) as error:
        return _fail("train", error)
    except trainer.TrainingError as error:
        print(f"rlp-jax train: {error}", file=sys.stderr)
        return 1
    return 0


def _demo(args: argparse.Namespace) -> int:
    from rlp_jax import demo

    demo.run_demo(args.workdir, task=args.task, warmup_steps=args.warmup_steps, rlp_steps=args.steps,
                  eval_positions=args.eval_positions)
    return 0


def _export(args: argparse.Namespace) -> int:
    from rlp_jax import build
    from rlp_jax import config as config_lib
    from rlp_jax.data.tokenizer import load_tokenizer
    from rlp_jax.evaluation_run import run_config
    from rlp_jax.models import convert

    try:
        model = build.model_from_run(args.workdir)
        spec = run_config(args.workdir).tokenizer
        try:
            tokenizer = load_tokenizer(spec)
        except (OSError, ValueError) as error:  # an HF tokenizer.json moved or deleted since the run
            tokenizer = None
            print(f"rlp-jax export: the run's tokenizer {spec!r} cannot be loaded ({error}), so the folder gets "
                  f"none; copy that tokenizer's tokenizer.json into {args.out}.", file=sys.stderr)
        out = convert.save_hf(model, args.out, dtype=args.dtype, tokenizer=tokenizer)  # either family
    except (config_lib.ConfigError, FileExistsError) as error:
        return _fail("export", error)
    files = "config.json + safetensors" + (" + tokenizer.json" if tokenizer is not None else "")
    print(f"wrote an HF folder ({files}) to {out}")
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


def _evaluate(args: argparse.Namespace) -> int:
    from rlp_jax.benchmarks import runner
    from rlp_jax.config import ConfigError
    from rlp_jax.models.hf import HFFormatError

    try:
        settings = runner.Settings(
            prompt_format=args.prompt, shots=args.shots, math_samples=args.samples, math_greedy=args.math_greedy,
            choice_mode=args.choice_mode, choice_samples=args.choice_samples, loglik_style=args.loglik_style,
            temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, max_new_tokens=args.max_new_tokens,
            max_prompt_len=args.max_prompt_len, seed=args.seed, batch_size=args.batch_size, limit=args.limit)
        out = args.out or (args.workdir and f"{args.workdir}/benchmarks") or "benchmarks"
        _, markdown = runner.run(args.tasks, settings, out, hf_dir=args.hf, workdir=args.workdir, step=args.step,
                                 tokenizer=args.tokenizer, data_dir=args.data_dir, mesh_mode=args.mesh,
                                 dtype=args.dtype)
    except (runner.BenchmarkError, ConfigError, HFFormatError, FileNotFoundError) as error:
        return _fail("evaluate", error)
    import jax

    if jax.process_index() == 0:  # the one process that writes the files
        print(markdown)
        print(f"wrote {out}.json, {out}.md and {out}.samples.jsonl")
    return 0


def _ablate(args: argparse.Namespace) -> int:
    from rlp_jax import ablate

    seeds = tuple(range(args.seeds))
    try:
        ablate.run_grid(args.grid, args.workdir, task=args.task, seeds=seeds, steps=args.steps,
                        warmup_steps=args.warmup_steps, eval_positions=args.eval_positions,
                        benchmark_items=args.bench_items)
    except ValueError as error:  # ConfigError included
        return _fail("ablate", error)
    return 0


def _benchmark_catalogue() -> str:
    """The task and suite names `rlp-jax evaluate --tasks` takes, from the benchmark registry."""
    from rlp_jax.benchmarks.tasks import SUITES, TASKS

    width = max(map(len, [*TASKS, *SUITES])) + 2
    lines = ["Tasks:", *(f"  {name:<{width}}{task.description}" for name, task in TASKS.items()),
             "Suites:", *(f"  {name:<{width}}{' '.join(members)}" for name, members in SUITES.items())]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    from rlp_jax.configs.demo import DEMO_TASKS

    parser = argparse.ArgumentParser(prog="rlp-jax", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    info = commands.add_parser("info", help="print versions and the devices JAX sees")
    info.set_defaults(run=_info)

    example = commands.add_parser(
        "losses-example", help="train a toy thought policy with rlp_jax.losses (seconds, CPU)")
    example.add_argument("--steps", type=int, default=150, help="policy-gradient steps (default 150)")
    example.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    example.set_defaults(run=_losses_example)

    train = commands.add_parser(
        "train", help="train on your text or the demo corpus; rerun the same command to resume",
        description="rlp-jax train [--corpus PATH ...] [--init-from-hf DIR] --workdir DIR [--config X] "
                    "[--config.a.b=value ...]\n\nA workdir holds one run: rerunning resumes it; a different "
                    "config, model, corpus or tokenizer there is refused (see --force-new).",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    train.add_argument("--corpus", nargs="+", metavar="PATH", default=None,
                       help=".txt, .jsonl or .jsonl.gz files, folders of them, or glob patterns (sets data.corpus; "
                            ".txt files split by data.txt_documents: paragraphs, lines or file)")
    train.add_argument("--init-from-hf", metavar="DIR", default=None,
                       help="start from an HF checkpoint folder (config.json, safetensors, tokenizer.json); its "
                            "tokenizer is used too")
    train.add_argument("--config", default=None,
                       help="a config .py with get_config(), or a bundled config's name: text (the default with "
                            "--corpus: RLP on ordinary text), demo (the default without: the demo's RLP stage), "
                            "rlp_paper, ...")
    train.add_argument("--workdir", required=True, help="the run's folder: checkpoints, metrics, evaluations")
    train.add_argument("--force-new", action="store_true",
                       help="if WORKDIR holds another run, move it whole to WORKDIR/archive/<time> and start afresh")
    train.add_argument("--executable", default=None, metavar="DIR",
                       help="run the train step saved by `rlp-jax compile --save-executable DIR` instead of "
                            "compiling it (refused unless it is this run's very program)")
    train.set_defaults(run=_train)

    demo = commands.add_parser("demo", help="the bundled CPU demo: warm-up, RLP, report (minutes)")
    demo.add_argument("--workdir", default="rlp_demo_run", help="where the demo writes (default: ./rlp_demo_run)")
    demo.add_argument("--task", default="addition", choices=DEMO_TASKS,
                      help="addition: 3-digit sums (default); carry: 6-digit sums whose leading digit hangs on "
                           "a long carry chain; cups: the cup a ball ends under after 10 swaps, where "
                           "thinking is necessary")
    demo.add_argument("--steps", type=int, default=None, help="RLP steps (default 300)")
    demo.add_argument("--warmup-steps", type=int, default=None, help="NTP warm-up steps (default: the task's, 150 for addition)")
    demo.add_argument("--eval-positions", type=int, default=None, help="held-out positions (default 512)")
    demo.set_defaults(run=_demo)

    export = commands.add_parser("export", help="a run's latest weights as an HF folder")
    export.add_argument("--workdir", required=True, help="a training run's workdir (for the demo: rlp_demo_run/rlp)")
    export.add_argument("--out", required=True,
                        help="the HF folder to write (config.json, safetensors, tokenizer.json, tokenizer_config.json)")
    export.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="dtype of the written weights (default float32)")
    export.set_defaults(run=_export)

    ev = commands.add_parser("eval", help="evaluate a run (or an HF folder) on held-out positions")
    ev.add_argument("--workdir", default=None, help="a training run's workdir")
    ev.add_argument("--hf", default=None, help="an HF folder instead of a run (needs --config)")
    ev.add_argument("--config", default=None, help="config for tokenizer and data (default: the run's)")
    ev.add_argument("--start-from", default=None, help="a run whose final weights are the 'start' baseline")
    ev.add_argument("--positions", type=int, default=None, help="held-out positions (default: the config's "
                                                                 "eval.num_positions)")
    ev.add_argument("--out", default=None, help="output path prefix for .json and .md (default: WORKDIR/eval_final)")
    ev.set_defaults(run=_eval)

    bm = commands.add_parser(
        "evaluate", help="benchmark accuracy (the paper's metric): pass@1 on math and science suites "
                         "(not `eval`, which measures held-out information gain)",
        description="rlp-jax evaluate (--hf DIR | --workdir DIR [--step N]) --tasks TASK_OR_SUITE ...\n\n"
                    "Benchmark accuracy as in the RLP paper's Tables 1-2. Math tasks: pass@1 averaged over\n"
                    "--samples sampled responses (\\boxed{} answers judged by math-verify). Multiple choice: the\n"
                    "mean of greedy accuracy and pass@1 over --choice-samples samples, or the options'\n"
                    "log-likelihood (--choice-mode loglik). A task marked 'local file' reads <task>.jsonl from\n"
                    "--data-dir; the demo tasks are a toy run's own held-out problems. Held-out information\n"
                    "gain is `rlp-jax eval`. See docs/evaluation.md.\n\n" + _benchmark_catalogue(),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    bm.add_argument("--hf", default=None, help="an HF model folder (config.json + safetensors + tokenizer.json)")
    bm.add_argument("--workdir", default=None, help="a training run's workdir instead of --hf")
    bm.add_argument("--step", type=int, default=None, help="the run's checkpoint step (default: the newest)")
    bm.add_argument("--tasks", nargs="+", default=["math_offline", "science_offline"],
                    help="task names, suite names (both listed above) or .jsonl files (default: math_offline "
                         "science_offline)")
    bm.add_argument("--data-dir", default=None, help="folder with <task>.jsonl files for sets no package ships")
    bm.add_argument("--tokenizer", default=None, help="tokenizer.json or 'bytes' (default: the model's own)")
    bm.add_argument("--prompt", default="think", choices=["think", "plain"],
                    help="think: reason inside <think>...</think>, then answer (default); plain: answer directly")
    bm.add_argument("--shots", type=int, default=0, help="worked examples before each question (0-4, default 0)")
    bm.add_argument("--samples", type=int, default=8, help="sampled responses per math item (default 8; 0: greedy)")
    bm.add_argument("--math-greedy", action="store_true", help="also one greedy response per math item")
    bm.add_argument("--choice-mode", default="generate", choices=["generate", "loglik"],
                    help="multiple choice: generate and grade the letter (default), or option log-likelihood")
    bm.add_argument("--choice-samples", type=int, default=4,
                    help="sampled responses per multiple-choice item beside the greedy one (default 4)")
    bm.add_argument("--loglik-style", default="letters", choices=["letters", "cloze"],
                    help="loglik mode: score the option letters (default) or the option texts")
    bm.add_argument("--temperature", type=float, default=0.6, help="sampling temperature (default 0.6)")
    bm.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling (default 0.95)")
    bm.add_argument("--top-k", type=int, default=0, help="top-k sampling (default 0: off)")
    bm.add_argument("--max-new-tokens", type=int, default=2048, help="tokens per response (default 2048)")
    bm.add_argument("--max-prompt-len", type=int, default=None, help="longer prompts keep their last tokens")
    bm.add_argument("--batch-size", type=int, default=16, help="prompts per generation batch (default 16)")
    bm.add_argument("--limit", type=int, default=None, help="evaluate only the first N items of each task")
    bm.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    bm.add_argument("--dtype", default=None, choices=["float32", "bfloat16"], help="compute dtype")
    bm.add_argument("--mesh", default="auto", choices=["auto", "none"],
                    help="auto: split batches over every device of every process, the model replicated (default); "
                         "none: one device per process")
    bm.add_argument("--out", default=None, help="output prefix for .json, .md, .samples.jsonl "
                                                "(default: WORKDIR/benchmarks or ./benchmarks)")
    bm.set_defaults(run=_evaluate)

    from rlp_jax import ablate

    ab = commands.add_parser("ablate", help="the paper's ablations at toy scale on the demo task")
    ab.add_argument("--grid", required=True, choices=ablate.GRID_NAMES, help="which ablation grid to run")
    ab.add_argument("--workdir", required=True, help="where each cell's run and the grid's table go")
    ab.add_argument("--task", default="addition", choices=DEMO_TASKS,
                    help="the demo task (default addition; carry and cups run under WORKDIR/<task>)")
    ab.add_argument("--seeds", type=int, default=2, help="seeds per cell (default 2)")
    ab.add_argument("--steps", type=int, default=None, help="RLP steps per cell (default: the demo's)")
    ab.add_argument("--warmup-steps", type=int, default=None, help="NTP warm-up steps (default: the demo's)")
    ab.add_argument("--eval-positions", type=int, default=None, help="held-out positions per cell (default: the "
                                                                      "demo's)")
    ab.add_argument("--bench-items", type=int, default=256,
                    help="held-out problems per cell for the benchmark columns (answer pass@1 and greedy, as "
                         "`rlp-jax evaluate` scores them; default 256, 0: off)")
    ab.set_defaults(run=_ablate)

    from rlp_jax import plan

    plan.register(commands)

    from rlp_jax import aot

    aot.register(commands)

    from rlp_jax import bench

    bench.register(commands)

    conv = commands.add_parser(
        "convert", help="HF folder (config.json + safetensors) <-> rlp-jax params folder (Qwen3, Llama, "
                        "Nemotron-H: by config.json's model_type)")
    direction = conv.add_mutually_exclusive_group(required=True)
    direction.add_argument("--from-hf", metavar="HF_DIR",
                           help="read an HF folder (model_type qwen3, llama or nemotron_h), write rlp-jax params")
    direction.add_argument("--to-hf", metavar="PARAMS_DIR", help="read rlp-jax params, write an HF folder")
    conv.add_argument("--out", required=True, help="output folder")
    conv.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                      help="dtype of the written weights")
    conv.set_defaults(run=_convert)
    return parser


def _quiet_logs(debug: bool) -> None:
    """absl and TFDS talk at INFO (dataset preparation, progress bars with escape codes); a user
    sees warnings and errors only, unless --debug."""
    if debug:
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    for name in ("absl", "tensorflow_datasets", "orbax", "jax._src.xla_bridge"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # TFDS warns about every builder config it has not registered: ours are all local.
    logging.getLogger("absl").addFilter(lambda record: not record.getMessage().startswith(
        ("Using custom data configuration", "Metadata file does not exist")))  # the latter: Orbax
    # restoring only the params of a checkpoint (rlp-jax evaluate, the demo's benchmark table)
    try:
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.WARNING)
    except ImportError:
        pass


def main(argv: list[str] | None = None) -> int:
    global _DEBUG
    argv = list(sys.argv[1:] if argv is None else argv)
    _DEBUG = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    if argv[:1] == ["compile"]:  # before JAX starts: the targets are compile-only (rlp_jax.aot)
        from rlp_jax import aot

        folder = next((b for a, b in zip(argv, argv[1:]) if a == "--compilers"), None)
        aot.prepare_environment(folder)
    _quiet_logs(_DEBUG)
    # ml_collections-style overrides (--config.a.b=value) are collected before argparse sees them.
    overrides = [a.removeprefix("--config.") for a in argv if a.startswith("--config.")]
    argv = [a for a in argv if not a.startswith("--config.")]
    args = build_parser().parse_args(argv)
    if overrides and args.command not in ("train", "plan", "compile"):
        print(f"rlp-jax {args.command}: --config.* overrides apply to 'train', 'plan' and 'compile' only.",
              file=sys.stderr)
        return 2
    args.overrides = overrides
    if args.command not in ("plan", "compile"):  # multi-host runs: jax.distributed from the environment
        from rlp_jax import distributed

        try:
            distributed.maybe_initialize_from_env()
        except distributed.DistributedConfigError as error:
            return _fail(args.command, error)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
