"""`rlp-jax evaluate`: a model (an HF folder, or a training run's checkpoint) on benchmark tasks
and suites, with the paper's protocols.

- math tasks: pass@1 averaged over `math_samples` sampled responses (the paper: 8), each graded
  by `graders.grade_math`; pass@k over those samples and, optionally, greedy accuracy beside it.
- multiple-choice tasks, `choice_mode="generate"` (the paper's science protocol): the mean of
  greedy accuracy and pass@1 over `choice_samples` (4) sampled responses, graded by the letter;
  `choice_mode="loglik"`: the option with the highest log-likelihood (accuracy and
  length-normalised accuracy), no generation.

A task's `score` is its protocol's number; a suite's score is the mean over its tasks (reported
when every task of the suite was evaluated). Results are JSON + markdown, with the settings
recorded beside the numbers, and every response in a `.samples.jsonl` file.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from rlp_jax import sharding
from rlp_jax.benchmarks import generate as gen
from rlp_jax.benchmarks import graders, loglik, metrics, prompts, tasks, text
from rlp_jax.benchmarks.tasks import BenchmarkError, Task
from rlp_jax.models import kernels


@dataclasses.dataclass(frozen=True)
class Settings:
    prompt_format: str = "think"  # prompts.FORMATS
    shots: int = 0
    math_samples: int = 8  # sampled responses per math item (pass@1 is their mean)
    math_greedy: bool = False  # also one greedy response per math item
    choice_mode: str = "generate"  # "generate" (greedy + samples, graded by letter) or "loglik"
    choice_samples: int = 4  # sampled responses per multiple-choice item (generate mode)
    loglik_style: str = "letters"  # prompts.LOGLIK_STYLES
    temperature: float = 0.6
    top_p: float = 0.95
    top_k: int = 0
    max_new_tokens: int = 2048
    max_prompt_len: int | None = None  # longer prompts keep their last tokens
    seed: int = 0
    batch_size: int = 16  # prompts per generation batch (rows: × samples); rows per log-likelihood batch
    limit: int | None = None  # the first N items of each task

    def __post_init__(self):
        if self.prompt_format not in prompts.FORMATS:
            raise BenchmarkError(f"prompt format {self.prompt_format!r} is unknown; use one of "
                                 f"{', '.join(prompts.FORMATS)}.")
        if self.choice_mode not in ("generate", "loglik"):
            raise BenchmarkError(f"choice mode {self.choice_mode!r} is unknown; use 'generate' or 'loglik'.")
        if self.loglik_style not in prompts.LOGLIK_STYLES:
            raise BenchmarkError(f"log-likelihood style {self.loglik_style!r} is unknown; use one of "
                                 f"{', '.join(prompts.LOGLIK_STYLES)}.")
        if not 0 <= self.shots <= len(prompts.MATH_SHOTS):
            raise BenchmarkError(f"shots={self.shots} is out of range; use 0 to {len(prompts.MATH_SHOTS)}.")
        if self.math_samples < 0 or self.choice_samples < 0:
            raise BenchmarkError("sample counts must be >= 0; use 0 for greedy only.")
        if self.temperature < 0 or (self.temperature == 0 and (self.math_samples or self.choice_samples)):
            raise BenchmarkError(f"temperature={self.temperature} cannot draw samples; use a temperature > 0, or "
                                 "--samples 0 --choice-samples 0 for greedy decoding only.")
        if self.max_new_tokens < 1 or self.batch_size < 1:
            raise BenchmarkError("max_new_tokens and batch_size must be >= 1.")
        if self.limit is not None and self.limit < 1:
            raise BenchmarkError(f"limit={self.limit}; evaluate at least 1 item per task.")


# ---------------------------------------------------------------- models

def load_model(hf_dir: str | None = None, workdir: str | None = None, step: int | None = None, *,
               mesh=None, rules=sharding.DEFAULT_RULES, dtype: str | None = None):
    """(model, its description, the tokenizer spec that goes with it) for an HF folder or a run's
    checkpoint (`step`, default the newest). With `mesh`, an HF folder's params are placed by
    `rules`, a run's are replicated."""
    if (hf_dir is None) == (workdir is None):
        raise BenchmarkError("give exactly one of an HF folder (--hf) or a training run (--workdir).")
    overrides = {} if dtype is None else {"dtype": dtype}
    if hf_dir is not None:
        from rlp_jax.models import convert  # any family's HF folder, by its config.json model_type

        if not Path(hf_dir).is_dir():
            raise BenchmarkError(f"{hf_dir} is not a folder; pass --hf with an HF model folder (config.json + "
                                 "safetensors).")
        model = kernels.on_local_platform(convert.load_hf(hf_dir, mesh=mesh, rules=rules, **overrides))
        return model, f"hf:{Path(hf_dir).absolute()}", str(hf_dir)
    config = _run_config(Path(workdir))
    model, used_step = _run_model(Path(workdir), step, mesh)
    if dtype is not None:
        model.config = model.config.replace(dtype=dtype)
    return kernels.on_local_platform(model), f"run:{Path(workdir).absolute()}@step{used_step}", config["tokenizer"]


def _run_config(workdir: Path) -> dict:
    """A run's config.json (what `rlp_jax.evaluation_run.run_config` reads, without importing an
    entry point)."""
    from rlp_jax import checkpoint as ckpt_lib
    from rlp_jax.config import ConfigError

    path = ckpt_lib.RunDir(workdir).require_run().config
    if not path.exists():
        raise ConfigError(f"{workdir} has no config.json; pass the --workdir of an rlp-jax training run.")
    return json.loads(path.read_text())


def _run_model(workdir: Path, step: int | None, mesh=None):
    """A run's model (of any family) at checkpoint `step` (default: the newest) and
    that step. With `mesh` (data parallel), every device of the mesh holds the whole model: the
    checkpoint is restored replicated onto it, whatever topology saved it (a multi-host run's
    processes each read it)."""
    import jax
    import orbax.checkpoint as ocp
    from flax import nnx

    from rlp_jax import checkpoint as ckpt_lib
    from rlp_jax.models import convert
    from rlp_jax.models.families import family_of

    run = ckpt_lib.RunDir(workdir).require_run()
    steps: list[int] = []
    if run.checkpoints.exists():
        checkpointer = ckpt_lib.Checkpointer(run.checkpoints, keep=1_000_000, create=False)
        steps = list(checkpointer.steps())
        checkpointer.close()
    if not steps:
        raise BenchmarkError(f"{workdir} has no checkpoint; evaluate a run that has saved at least one step.")
    step = steps[-1] if step is None else step
    if step not in steps:
        raise BenchmarkError(f"{workdir} has no checkpoint at step {step}; its saved steps are "
                             f"{', '.join(map(str, steps))}.")
    path = run.checkpoints / str(step) / "state"
    # The params only, onto our devices (the stored shardings are those of the devices that saved them).
    onto = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()) if mesh is not None \
        else jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    stored = ocp.StandardCheckpointer().metadata(path).item_metadata.tree["params"]
    target = {"params": jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=onto),
                                     stored)}
    restored = ocp.PyTreeCheckpointer().restore(path, args=ocp.args.PyTreeRestore(
        item=target, restore_args=jax.tree.map(lambda x: ocp.ArrayRestoreArgs(sharding=onto), target),
        partial_restore=True))
    pure = ckpt_lib.pure_params(restored["params"])
    config = convert.config_from_json(run.model_config.read_text())
    model = family_of(config).abstract_model(config)
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, jax.tree.map(jax.numpy.asarray, pure))
    nnx.update(model, state)
    return model, step


# ---------------------------------------------------------------- one task

def _generation_config(settings: Settings, samples: int, greedy: bool, task: Task | None = None
                       ) -> gen.GenerationConfig:
    max_new = min(settings.max_new_tokens, task.max_new_tokens or settings.max_new_tokens) if task \
        else settings.max_new_tokens
    if greedy:
        return gen.GenerationConfig(max_new_tokens=max_new, temperature=0.0, num_samples=1,
                                    seed=settings.seed, batch_size=settings.batch_size,
                                    max_prompt_len=settings.max_prompt_len)
    return gen.GenerationConfig(max_new_tokens=max_new, temperature=settings.temperature,
                                top_p=settings.top_p, top_k=settings.top_k, num_samples=samples, seed=settings.seed + 1,
                                batch_size=settings.batch_size, max_prompt_len=settings.max_prompt_len)


def _responses(model, tok, prompt_ids, cfg, label, mesh, rules, progress):
    out = gen.generate(model, prompt_ids, cfg, stop_ids=tok.stop_ids, pad_id=tok.pad_id, mesh=mesh, rules=rules,
                       label=label, progress=progress)
    stops = set(tok.stop_ids)
    texts = [[gen.cut_at_stop(tok.decode([t for t in sample if t not in stops]), prompts.stop_strings())
              for sample in per_prompt] for per_prompt in out.tokens]
    lengths = np.array([[len(s) for s in per_prompt] for per_prompt in out.tokens])
    return texts, out, lengths


def _grade(task: Task, item, response: str) -> tuple[bool, str | None, dict[str, bool]]:
    """(correct, extracted answer, {further criterion: correct}) for one response."""
    if task.grade is not None:
        return task.grade(item, response)
    if item.is_choice:
        return (*graders.grade_choice(item.answer_index, response, len(item.choices)), {})
    return (*graders.grade_math(item.answer, response), {})


def prompt_text(task: Task, item, settings: Settings) -> str:
    """The prompt of `item`: the task's own (toy tasks: the bare problem) or prompts.generation_prompt."""
    return task.prompt(item) if task.prompt is not None else \
        prompts.generation_prompt(item, settings.prompt_format, settings.shots)


def evaluate_task(model, tok, task: Task, items, settings: Settings, *, mesh=None, rules=sharding.DEFAULT_RULES,
                  progress: Callable[[str], None] | None = None) -> tuple[dict, list[dict]]:
    """(the task's numbers, one record per item) for `items` of `task`."""
    if _scored_by_loglik(task, settings):
        return _loglik_task(model, tok, task, items, settings, mesh, rules)
    samples = settings.math_samples if task.kind == "math" else settings.choice_samples
    prompt_ids = [tok.encode_prompt(prompt_text(task, item, settings)) for item in items]
    records = [{"id": item.id, "answer": item.answer if not item.is_choice else graders.LETTERS[item.answer_index]}
               for item in items]
    result: dict[str, Any] = {"kind": task.kind, "num_items": len(items)}
    runs = _runs(task, settings)
    correct: dict[str, np.ndarray] = {}
    further: dict[str, dict[str, np.ndarray]] = {}  # criterion -> run -> correct [item, sample]
    tokens, seconds, lengths_all, finished_all = 0, 0.0, [], []
    for name, count in runs:
        cfg = _generation_config(settings, count, greedy=name == "greedy", task=task)
        texts, out, lengths = _responses(model, tok, prompt_ids, cfg, f"{task.name} {name}", mesh, rules, progress)
        grades = [[_grade(task, item, response) for response in per_item] for item, per_item in zip(items, texts)]
        correct[name] = np.array([[ok for ok, _, _ in g] for g in grades], bool)
        for criterion in (grades[0][0][2] if grades and grades[0] else {}):
            further.setdefault(criterion, {})[name] = np.array([[x[criterion] for _, _, x in g] for g in grades], bool)
        for record, per_item, g in zip(records, texts, grades):
            record[name] = [{"response": r, "extracted": e, "correct": ok, **x} for r, (ok, e, x) in zip(per_item, g)]
        tokens, seconds = tokens + out.num_tokens, seconds + out.seconds
        lengths_all.append(lengths.ravel())
        finished_all.append(out.finished.ravel())
    if "greedy" in correct:
        result["greedy"] = metrics.greedy_accuracy(correct["greedy"][:, 0])
    if "sampled" in correct:
        result["pass@1"] = metrics.pass_at_1(correct["sampled"])
        result["pass@1_se"] = metrics.standard_error(correct["sampled"])
        result[f"pass@{samples}"] = metrics.mean_pass_at_k(correct["sampled"], samples)
    for criterion, by_run in further.items():  # e.g. the toy tasks' first answer digit
        if "greedy" in by_run:
            result[f"{criterion}_greedy"] = metrics.greedy_accuracy(by_run["greedy"][:, 0])
        if "sampled" in by_run:
            result[f"{criterion}_pass@1"] = metrics.pass_at_1(by_run["sampled"])
    if task.kind == "math":
        result["protocol"] = (f"pass@1 averaged over {samples} samples" if samples else "greedy accuracy")
        result["score"] = result["pass@1"] if samples else result["greedy"]
    elif samples:
        result["protocol"] = f"mean of greedy and pass@1 over {samples} samples"
        result["score"] = metrics.science_score(correct["greedy"][:, 0], correct["sampled"])
    else:
        result["protocol"] = "greedy accuracy"
        result["score"] = result["greedy"]
    all_lengths, all_finished = np.concatenate(lengths_all), np.concatenate(finished_all)
    result |= {"mean_response_tokens": float(all_lengths.mean()), "truncated_frac": float(1 - all_finished.mean()),
               "generated_tokens": int(tokens), "tokens_per_second": tokens / seconds if seconds else math.nan}
    return result, records


def _scored_by_loglik(task: Task, settings: Settings) -> bool:
    return task.kind == "choice" and settings.choice_mode == "loglik"


def _runs(task: Task, settings: Settings) -> list[tuple[str, int]]:
    """The generation runs of a task: `(name, samples per item)`, greedy and / or sampled."""
    samples = settings.math_samples if task.kind == "math" else settings.choice_samples
    want_greedy = (settings.math_greedy if task.kind == "math" else True) or samples == 0
    return ([("greedy", 1)] if want_greedy else []) + ([("sampled", samples)] if samples else [])


def lowered_programs(graphdef, abstract_params, tok, loaded: list[tuple[Task, list]], settings: Settings, *,
                     max_len: int, mesh, rules=sharding.DEFAULT_RULES) -> list[tuple[str, Callable]]:
    """`(name, lower)` of every program `evaluate` runs for `loaded` (task, items) on `mesh`, each
    at its widest batch: per task and run the sampler, per log-likelihood task the scoring
    (`max_len`: the model's context). Programs of identical shapes are listed once, naming their
    tasks. For `rlp-jax compile`, over abstract params."""
    programs: dict[tuple, tuple[list[str], Callable]] = {}
    for task, items in loaded:
        if _scored_by_loglik(task, settings):
            contexts, continuations, _, _ = loglik.choice_rows(tok, items, settings.loglik_style, settings.shots)
            lower = functools.partial(loglik.lower_widest, graphdef, abstract_params, contexts, continuations,
                                      batch_size=settings.batch_size, max_len=settings.max_prompt_len or max_len,
                                      mesh=mesh, rules=rules)
            shape = loglik.widest_shape(contexts, continuations, settings.max_prompt_len or max_len)
            programs.setdefault(("loglik", shape), ([], lower))[0].append(f"{task.name} option log-likelihoods")
            continue
        prompt_ids = [tok.encode_prompt(prompt_text(task, item, settings)) for item in items]
        for name, count in _runs(task, settings):
            cfg = _generation_config(settings, count, greedy=name == "greedy", task=task)
            lower = functools.partial(gen.lower_widest, graphdef, abstract_params, prompt_ids, cfg,
                                      stop_ids=tok.stop_ids, pad_id=tok.pad_id, mesh=mesh, rules=rules)
            key = ("generate", gen.widest_prompt(prompt_ids, cfg), cfg)  # cfg: frozen, hashable
            programs.setdefault(key, ([], lower))[0].append(f"{task.name} {name}")
    return [("benchmark: " + ", ".join(names), lower) for names, lower in programs.values()]


def _loglik_task(model, tok, task, items, settings, mesh, rules):
    scored = loglik.score_items(model, tok, items, style=settings.loglik_style, shots=settings.shots,
                                batch_size=settings.batch_size, max_len=settings.max_prompt_len, mesh=mesh,
                                rules=rules)
    records = [{"id": item.id, "answer": graders.LETTERS[item.answer_index],
                "option_logprobs": [float(x) for x in lp], "correct": bool(c), "correct_norm": bool(cn)}
               for item, lp, c, cn in zip(items, scored.logprobs, scored.correct, scored.correct_norm)]
    acc = float(scored.correct.mean())
    protocol = f"log-likelihood of the options ({settings.loglik_style})"
    return ({"kind": task.kind, "num_items": len(items), "protocol": protocol,
             "acc": acc, "acc_se": metrics.standard_error(scored.correct[:, None]),
             "acc_norm": float(scored.correct_norm.mean()), "score": acc}, records)


# ---------------------------------------------------------------- tasks and suites

def evaluate(model, tok, task_list: list[Task], settings: Settings, *, data_dir=None, mesh=None,
             rules=sharding.DEFAULT_RULES, progress: Callable[[str], None] | None = None) -> tuple[dict, list[dict]]:
    """Every task of `task_list`: (result, per-item records). Items are loaded (and missing local
    files reported) before any model call."""
    loaded = [(task, task.load(data_dir, settings.limit)) for task in task_list]
    result: dict[str, Any] = {"settings": dataclasses.asdict(settings), "tasks": {}, "suites": {}}
    records = []
    for task, items in loaded:
        start = time.perf_counter()
        numbers, task_records = evaluate_task(model, tok, task, items, settings, mesh=mesh, rules=rules,
                                              progress=progress)
        numbers["seconds"] = time.perf_counter() - start
        result["tasks"][task.name] = numbers
        records += [{"task": task.name} | r for r in task_records]
        if progress is not None:
            progress(f"{task.name}: score {100 * numbers['score']:.2f} ({numbers['protocol']}, {len(items)} items)")
    done = result["tasks"]
    for suite, names in tasks.SUITES.items():
        if all(n in done for n in names):
            result["suites"][suite] = {"score": float(np.mean([done[n]["score"] for n in names])), "tasks": list(names)}
    if len(done) > 1:
        result["suites"]["all evaluated"] = {"score": float(np.mean([v["score"] for v in done.values()])),
                                             "tasks": list(done)}
    return result, records


def _pct(x) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.2f}"


def to_markdown(result: dict) -> str:
    s = result["settings"]
    lines = [f"# rlp-jax evaluate: {result.get('model', '')}", "",
             f"Prompt `{s['prompt_format']}`, {s['shots']} shots; sampling temperature {s['temperature']}, top-p "
             f"{s['top_p']}, top-k {s['top_k']}; max {s['max_new_tokens']} new tokens; seed {s['seed']}; math: "
             f"{s['math_samples']} samples per item; multiple choice: {s['choice_mode']}"
             + (f" ({s['choice_samples']} samples + greedy)" if s["choice_mode"] == "generate" else
                f" ({s['loglik_style']})")
             + (f"; first {s['limit']} items per task" if s["limit"] else "") + ". Scores in %.", "",
             "| task | items | protocol | score | ± s.e. | greedy | pass@k | tokens/s | truncated |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, t in result["tasks"].items():
        pass_k = next((f"{_pct(v)} (@{k.split('@')[1]})" for k, v in t.items()
                       if k.startswith("pass@") and k not in ("pass@1", "pass@1_se")), "—")
        se = t.get("pass@1_se", t.get("acc_se"))
        extra = (f"{t['tokens_per_second']:,.0f}", f"{100 * t['truncated_frac']:.1f}%") if "tokens_per_second" in t \
            else (f"acc_norm {_pct(t['acc_norm'])}", "—")
        lines.append(f"| {name} | {t['num_items']} | {t['protocol']} | {_pct(t['score'])} | {_pct(se)} | "
                     f"{_pct(t.get('greedy'))} | {pass_k} | {extra[0]} | {extra[1]} |")
    first = {name: t for name, t in result["tasks"].items() if "first_digit_greedy" in t or "first_digit_pass@1" in t}
    if first:  # the toy tasks: the first answer digit, what the toy RLP stage trains
        lines += ["", "| task | first answer digit: greedy | first answer digit: pass@1 |", "|---|---|---|"]
        lines += [f"| {name} | {_pct(t.get('first_digit_greedy'))} | {_pct(t.get('first_digit_pass@1'))} |"
                  for name, t in first.items()]
    if result["suites"]:
        lines += ["", "| suite | tasks | average score |", "|---|---|---|"]
        lines += [f"| {name} | {', '.join(v['tasks'])} | {_pct(v['score'])} |" for name, v in result["suites"].items()]
    return "\n".join(lines) + "\n"


def fit_batch(settings: Settings, mesh) -> Settings:
    """`settings` with its batch size rounded up to whole rows on every device of `mesh`."""
    if mesh is not None and settings.batch_size % mesh.size:
        settings = dataclasses.replace(settings, batch_size=-(-settings.batch_size // mesh.size) * mesh.size)
    return settings


def _tokenizer(spec: str, model) -> text.BenchmarkTokenizer:
    try:
        tok = text.load(spec)
    except BenchmarkError:
        raise
    except (OSError, ValueError) as error:
        raise BenchmarkError(f"tokenizer {spec!r} cannot be loaded ({error}); pass --tokenizer with a "
                             "tokenizer.json.") from None
    if tok.vocab_size > model.config.vocab_size:
        raise BenchmarkError(f"the tokenizer has {tok.vocab_size} tokens but the model only {model.config.vocab_size}; "
                             "pass --tokenizer with the model's own tokenizer.")
    return tok


def _run_seed(workdir) -> int:
    """A run's `seed`, which seeds its demo corpus and so its toy tasks' items (0 without a run)."""
    if workdir is None:
        return 0
    from rlp_jax.config import ConfigError

    try:
        return int(_run_config(Path(workdir)).get("seed", 0))
    except ConfigError:  # not a run: load_model says so
        return 0


def evaluate_run_dir(run_dir: str | Path, task_names=("demo_addition",), settings: Settings | None = None, *,
                     step: int | None = None, data_dir=None, mesh_mode: str = "auto", with_records: bool = False,
                     progress: Callable[[str], None] | None = None) -> dict:
    """A training run's checkpoint (`step`, default the newest) on benchmark tasks, in memory: the
    numbers `rlp-jax evaluate --workdir` writes, nothing written. The toy tasks read the run's own
    held-out problems (its corpus seed). Returns `{"model", "tokenizer", "step", "settings",
    "tasks": {task: numbers}, "suites"}` (+ `"records"`, one per item, with `with_records`); a toy
    task's numbers: `pass@1` (over `settings.math_samples` samples at `settings.temperature`),
    `greedy` (with `settings.math_greedy`), `first_digit_pass@1`, `first_digit_greedy`, `score`."""
    settings = settings or Settings()
    task_list = tasks.resolve(list(task_names), demo_seed=_run_seed(run_dir))
    for task in task_list:  # a missing local file is reported before the model is loaded
        task.load(data_dir, 1)
    mesh = _mesh(mesh_mode)
    settings = fit_batch(settings, mesh)
    model, description, tokenizer_spec = load_model(workdir=str(run_dir), step=step, mesh=mesh)
    tok = _tokenizer(tokenizer_spec, model)
    result, records = evaluate(model, tok, task_list, settings, data_dir=data_dir, mesh=mesh, progress=progress)
    result = {"model": description, "tokenizer": tok.name, "step": int(description.rsplit("@step", 1)[1])} | result
    if with_records:
        result["records"] = records
    return result


def run(task_names: list[str], settings: Settings, out: str | Path, *, hf_dir=None, workdir=None, step=None,
        tokenizer: str | None = None, data_dir=None, mesh_mode: str = "auto", dtype: str | None = None,
        progress: Callable[[str], None] | None = gen.print_progress) -> tuple[dict, str]:
    """Loads the model, evaluates, writes OUT.json, OUT.md and OUT.samples.jsonl; returns
    (result, markdown)."""
    task_list = tasks.resolve(task_names, demo_seed=_run_seed(workdir))
    for task in task_list:  # a missing local file is reported before the model is loaded
        task.load(data_dir, 1)
    mesh = _mesh(mesh_mode)
    settings = fit_batch(settings, mesh)
    model, description, default_tokenizer = load_model(hf_dir, workdir, step, mesh=mesh, dtype=dtype)
    tok = _tokenizer(tokenizer or default_tokenizer, model)
    if not _is_main_process():
        progress = None  # one progress report, process 0's
    result, records = evaluate(model, tok, task_list, settings, data_dir=data_dir, mesh=mesh, progress=progress)
    result = {"model": description, "tokenizer": tok.name} | result
    markdown = to_markdown(result)
    if not _is_main_process():  # every process holds the same results; process 0 writes them
        return result, markdown
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{out}.json").write_text(json.dumps(result, indent=2))
    Path(f"{out}.md").write_text(markdown)
    with open(f"{out}.samples.jsonl", "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return result, markdown


def _is_main_process() -> bool:
    import jax

    return jax.process_index() == 0


def _mesh(mode: str):
    """`auto`: batches split over every device of every process (params replicated) when there is
    more than one; `none`: one device (each process computes everything on its own device).

    Multi-host (jax.distributed, e.g. the RLP_JAX_* variables of rlp_jax.distributed): every
    process loads the same items and builds the same whole batches; each batch is placed as a
    global array over the mesh (`sharding.place_batch`), and the outputs are gathered whole on
    every process (`loglik.to_host`), so every process holds the same results."""
    import jax

    if mode not in ("auto", "none"):
        raise BenchmarkError(f"mesh mode {mode!r} is unknown; use 'auto' or 'none'.")
    if mode == "none" or jax.device_count() == 1:
        return None
    return sharding.make_mesh((jax.device_count(), 1, 1))
