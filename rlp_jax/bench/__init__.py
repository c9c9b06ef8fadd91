"""`rlp-jax bench`: how fast rlp-jax runs on this machine, against its matmul peak and against
the same model in HF transformers (PyTorch). See docs/benchmarks.md.

Measured in one run: (1) matmul roofline, (2) policy update (forward + backward) tokens/s and MFU,
(3) the sampler's prefill and its decode loop, timed apart, at several batch sizes, (4) an RLP step
piece by piece, (5) the PyTorch peer on identical weights. Medians of up to `--repeats` timed calls
after one untimed warm-up (3 once their median is within 10 % of the fastest).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

# A CPU-sized model whose update is dominated by matmuls (the presets `tiny` and `demo` are too
# small for that: their runtime is dispatch and elementwise work). 16.8M parameters. Kept as plain
# fields so that building the CLI parser does not import JAX.
BENCH_MODELS: dict[str, dict[str, Any]] = {
    "bench-cpu": dict(family="qwen3", vocab_size=8192, hidden_size=512, num_layers=4, num_heads=8,
                      num_kv_heads=4, head_dim=64, intermediate_size=1536, tie_embeddings=True,
                      rope_theta=10_000.0, rms_norm_eps=1e-6, max_position_embeddings=4096),
}

# The aims of docs/benchmarks.md. On a CPU: decode at batch 16 against HF `generate`; on an
# accelerator: decode against the measured memory bandwidth and the update against the matmul peak.
AIMS = {"cpu": {"decode_speedup_b16": 2.0, "update_mfu": 0.40, "scoring_fraction": 0.05},
        "accelerator": {"decode_bandwidth_fraction": 0.60, "update_mfu": 0.45, "scoring_fraction": 0.05}}

# What `--shape` sets unless a flag says otherwise. `cpu`: the CPU aims' shapes on the bench-cpu
# model; `paper`: the paper's RLP step (Qwen3-1.7B, context 2048, G 16, thoughts of 2048 tokens) on
# as many prompts as one 80-141 GB GPU holds for the whole step (4; raise --batch where more fit).
SHAPES: dict[str, dict[str, Any]] = {
    "cpu": dict(model="bench-cpu", dtype="float32", remat="none", batch=4, rollouts=4, context=128, thought=128,
                decode_prompt=1024, decode_new=256, decode_batches=(1, 16), roofline_sizes=(1024, 2048, 4096),
                repeats=5),
    "paper": dict(model="qwen3-1.7b", dtype="bfloat16", remat="full", batch=4, rollouts=16, context=2048,
                  thought=2048, decode_prompt=2048, decode_new=256, decode_batches=(16, 64),
                  roofline_sizes=(4096, 8192), repeats=3),
}


# A CPU-sized Nemotron-H hybrid (rlp_jax.models.nemotron_h): Mamba-2, attention and ReLU² MLP
# blocks at the bench-cpu model's width. 19.1M parameters (8.4M of them embedding and LM head).
BENCH_HYBRID_MODELS: dict[str, dict[str, Any]] = {
    "bench-hybrid-cpu": dict(vocab_size=8192, hidden_size=512, pattern="M-M*-M-", num_heads=8, num_kv_heads=4,
                             head_dim=64, intermediate_size=1536, mamba_num_heads=16, mamba_head_dim=64,
                             ssm_state_size=64, n_groups=2, chunk_size=64),
}


# The bench models above by the model family whose config their fields are (rlp_jax.models.families).
BENCH_FAMILY_MODELS: dict[str, dict[str, dict[str, Any]]] = {"transformer": BENCH_MODELS,
                                                             "nemotron_h": BENCH_HYBRID_MODELS}


def model_config(name: str, vocab_size: int | None, dtype: str, remat: str = "none"):
    """The config (of its model family) of a bench model or preset, in `dtype`, with `remat` in
    the update."""
    from rlp_jax.models.families import FAMILIES

    table = {}
    for family in FAMILIES:
        bench_models = BENCH_FAMILY_MODELS.get(family.name, {})
        table |= {n: family.config_type(**fields) for n, fields in bench_models.items()} | dict(family.presets)
    if name not in table:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(table)}.")
    config = table[name].replace(dtype=dtype, param_dtype=dtype, remat=remat)
    return config if vocab_size is None else config.replace(vocab_size=vocab_size)


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers")
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give one or more positive integers")
    return values


def register(subparsers) -> argparse.ArgumentParser:
    """Adds the `bench` subcommand to an argparse subparsers object."""
    p = subparsers.add_parser(
        "bench", help="measure speed: matmul peak, update MFU, decode, RLP step, vs HF transformers",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="cpu", choices=sorted(SHAPES),
                   help="preset of every shape flag below: cpu (default: the CPU aims) or paper (the paper's "
                        "RLP step on Qwen3-1.7B); a flag given explicitly wins")
    p.add_argument("--model", default=None,
                   help="bench-cpu (the cpu shape's model; docs/benchmarks.md) or any rlp_jax.models preset, "
                        "e.g. tiny, demo, qwen3-0.6b, qwen3-1.7b; the Nemotron-H hybrid: bench-hybrid-cpu, "
                        "nemotron-h-tiny, nemotron-nano-12b-v2, ...")
    p.add_argument("--vocab", type=int, default=None, help="override the preset's vocabulary size")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                   help="parameter and compute dtype of both frameworks")
    p.add_argument("--remat", default=None, choices=["none", "dots_saveable", "full"],
                   help="rematerialisation in the update (the paper configs use full)")
    p.add_argument("--json", metavar="OUT", default=None, help="also write every number to this JSON file")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed repetitions per measurement, at most (median; it stops after 3 once their median "
                        "is within 10%% of the fastest)")
    p.add_argument("--skip-torch", action="store_true", help="rlp-jax only (torch not imported)")
    p.add_argument("--batch", type=int, default=None, help="RLP step: prompts B")
    p.add_argument("--rollouts", type=int, default=None, help="RLP step: thoughts per prompt G")
    p.add_argument("--context", type=int, default=None, help="RLP step: context tokens")
    p.add_argument("--thought", type=int, default=None, help="RLP step: thought tokens (all sampled)")
    p.add_argument("--targets", type=int, default=1, help="RLP step: scored next tokens K")
    p.add_argument("--decode-prompt", type=int, default=None, help="decode: prompt tokens per row")
    p.add_argument("--decode-new", type=int, default=None, help="decode: generated tokens per row")
    p.add_argument("--decode-batches", type=_ints, default=None, help="decode: batch sizes, e.g. 1,16,64")
    p.add_argument("--block-len", type=int, default=256,
                   help="rollout-cache slots per block (rlp.cache_block_len): the granularity of what a decode "
                        "step reads")
    p.add_argument("--roofline-sizes", type=_ints, default=None,
                   help="matmul sizes n (n×n @ n×n) for the peak")
    p.add_argument("--bandwidth-mib", type=int, default=None,
                   help="array size for the memory-bandwidth measurement (default 256 on CPU, 4096 elsewhere)")
    p.add_argument("--profile", metavar="DIR", default=None,
                   help="also trace one update and the decode at batch 16 (or the largest batch "
                        "below) with jax.profiler into DIR, and print their costliest XLA operations")
    p.add_argument("--seed", type=int, default=0, help="seed of the random model and batches (default 0)")
    p.set_defaults(run=run)
    return p


def with_shape_preset(args: argparse.Namespace) -> argparse.Namespace:
    """Every shape flag left unset takes the value of `--shape`'s preset."""
    for name, value in SHAPES[args.shape].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def run(args: argparse.Namespace) -> int:
    args = with_shape_preset(args)
    try:
        config = model_config(args.model, args.vocab, args.dtype, args.remat)
        if args.repeats < 1:
            raise ValueError(f"--repeats={args.repeats}; time at least one repetition.")
        if args.decode_new < 2:
            raise ValueError(f"--decode-new={args.decode_new}; decode needs at least 2 new tokens.")
        if config.vocab_size < 4:
            raise ValueError(f"vocab_size={config.vocab_size}; the bench needs at least 4 tokens.")
    except ValueError as error:
        print(f"rlp-jax bench: {error}", file=sys.stderr)
        return 2
    result = measure_all(config, args)
    print(format_table(result))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}")
    return 0


_START = [time.perf_counter()]


def _progress(text: str) -> None:
    print(f"[bench {time.perf_counter() - _START[0]:6.1f} s] {text}", file=sys.stderr, flush=True)


def measure_all(config, args: argparse.Namespace) -> dict[str, Any]:
    import jax

    from rlp_jax.bench import jax_side, measure
    from rlp_jax.models import kernels
    from rlp_jax.models.families import family_of

    # The kernels a training run compiles for this platform (build.kernels_for): fused attention on
    # GPU / TPU, the CPU form of the decode's cached attention.
    config = kernels.resolve_kernels(config, jax.default_backend())
    family = family_of(config)
    load_before = measure.load_average()
    started = time.time()
    _START[0] = time.perf_counter()
    shapes = jax_side.Shapes(
        batch=args.batch, rollouts=args.rollouts, context=args.context, thought=args.thought,
        targets=args.targets, decode_prompt=args.decode_prompt, decode_new=args.decode_new,
        decode_batches=tuple(args.decode_batches), roofline_sizes=tuple(args.roofline_sizes),
        repeats=args.repeats, block_len=args.block_len,
        bandwidth_mib=args.bandwidth_mib or (256 if measure.machine()["backend"] == "cpu" else 4096))
    result: dict[str, Any] = {
        "machine": measure.machine(),
        "model": {"name": args.model, "family": family.json_tag(config),
                  "hybrid": family.hybrid, "dtype": config.dtype, "num_params": config.num_params(),
                  "matmul_params": measure.matmul_params(config),
                  "config": {k: _json_value(v) for k, v in vars(config).items() if k != "rope_scaling"}},
        "shapes": {"batch": shapes.batch, "rollouts": shapes.rollouts, "context": shapes.context,
                   "thought": shapes.thought, "targets": shapes.targets, "rows": shapes.rows,
                   "update_seq_len": shapes.seq_len, "decode_prompt": shapes.decode_prompt,
                   "decode_new": shapes.decode_new, "decode_batches": list(shapes.decode_batches),
                   "temperature": shapes.temperature, "repeats": shapes.repeats, "block_len": shapes.block_len,
                   "settled_after": measure.SETTLED_AFTER, "settled_within": measure.SETTLED,
                   "shape_preset": args.shape},
    }
    _progress("matmul roofline")
    result["roofline"] = {"jax": jax_side.roofline(shapes.roofline_sizes, shapes.repeats)}
    _progress("memory bandwidth")
    result["bandwidth"] = jax_side.bandwidth(shapes.bandwidth_mib, shapes.repeats)
    read_bw = result["bandwidth"]["bytes_per_s"]
    peak_key = "bf16" if config.dtype == "bfloat16" else "f32"
    peak = result["roofline"]["jax"][peak_key]["peak_gflops"]

    _progress("building the model and one batch of rollouts")
    prepared = jax_side.prepare(config, shapes, args.seed)
    _progress("policy update (forward + backward)")
    upd = jax_side.update(prepared)
    upd["peak_gflops"] = peak
    upd["fwd_bwd_mfu"] = upd["fwd_bwd_gflops"] / peak
    upd["update_mfu"] = upd["update_gflops"] / peak
    result["update"] = {"jax": upd}

    model = jax_side.model_of(prepared)
    result["decode"] = {"jax": {}}
    for b in shapes.decode_batches:
        _progress(f"decode, batch {b}")
        result["decode"]["jax"][str(b)] = jax_side.decode(model, shapes, b, args.seed, read_bw)

    _progress("RLP step, piece by piece")
    result["step"] = jax_side.step_breakdown(prepared, upd)

    if args.profile:
        _progress(f"profiling (traces under {args.profile})")
        small = [b for b in shapes.decode_batches if b <= 16]
        b = max(small) if small else min(shapes.decode_batches)
        result["profile"] = {"update": jax_side.profile_update(prepared, f"{args.profile}/update")} | {
            f"{name}_b{b}": ops for name, ops in jax_side.profile_decode(model, shapes, b, args.profile).items()}

    if not args.skip_torch:
        from rlp_jax.bench import torch_side

        _progress("PyTorch peer: export, load, check weights")
        peer = torch_side.Peer(model, threads=measure.cores_used())
        result["torch"] = peer.versions() | {"max_abs_logit_diff": peer.max_logit_diff(model)}
        result["roofline"]["torch"] = peer.matmul_peak(shapes.roofline_sizes, shapes.repeats)
        _progress("PyTorch forward + backward")
        result["update"]["torch"] = peer.fwd_bwd(prepared)
        result["decode"]["torch"] = {}
        for b in shapes.decode_batches:
            _progress(f"PyTorch generate, batch {b}")
            result["decode"]["torch"][str(b)] = peer.decode(shapes, b, args.seed)
        result["ratios"] = ratios(result)
        # The machine's peak is the best any framework reached; rlp-jax's MFU against that too.
        best = max(peak, result["roofline"]["torch"][peak_key]["peak_gflops"])
        upd["best_peak_gflops"] = best
        upd["update_mfu_best_peak"] = upd["update_gflops"] / best
        upd["fwd_bwd_mfu_best_peak"] = upd["fwd_bwd_gflops"] / best

    result["aims"] = aims(result)
    result["machine"]["load_before"] = load_before
    result["machine"]["load_after"] = measure.load_average()
    result["wall_s"] = time.time() - started
    return result


def _json_value(value):
    """A config field as strict JSON takes it (the hybrid's time_step_limit holds an infinity)."""
    if isinstance(value, tuple):
        return [_json_value(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def ratios(result: dict[str, Any]) -> dict[str, float | None]:
    """rlp-jax throughput / PyTorch throughput (> 1: rlp-jax is faster); None where either side
    has no number."""
    div = lambda a, b: None if a is None or b is None else a / b
    out = {"fwd_bwd": div(result["update"]["jax"]["fwd_bwd_tokens_per_s"],
                          result["update"]["torch"]["fwd_bwd_tokens_per_s"])}
    for b, ours in result["decode"]["jax"].items():
        theirs = result["decode"]["torch"][b]
        for key in ("decode", "prefill", "generate"):
            out[f"{key}_b{b}"] = div(ours[f"{key}_tokens_per_s"], theirs[f"{key}_tokens_per_s"])
    return out


def aims(result: dict[str, Any]) -> dict[str, Any]:
    upd, step = result["update"]["jax"], result["step"]
    table = AIMS["cpu" if result["machine"]["backend"] == "cpu" else "accelerator"]
    decode16 = result["decode"]["jax"].get("16", {})
    values = {"update_mfu": upd["update_mfu"], "scoring_fraction": step["fractions"]["scoring"],
              "decode_speedup_b16": result.get("ratios", {}).get("decode_b16"),
              "decode_bandwidth_fraction": decode16.get("bandwidth_fraction")}
    # Why an aim has no value, rather than an empty verdict.
    why = {"decode_speedup_b16": ("batch 16 not measured: add it to --decode-batches" if not decode16
                                  else "PyTorch skipped: --skip-torch"),
           "decode_bandwidth_fraction": "batch 16 not measured: add it to --decode-batches"}
    out = {}
    for name, aim in table.items():
        value = values[name]
        below = name == "scoring_fraction"  # an aim from below: at most this share of the step
        out[name] = {"value": value, "aim": aim,
                     "met": None if value is None else (value <= aim if below else value >= aim)}
        if value is None:
            out[name]["why"] = why[name]
    out["update_mfu"]["against"] = ("rlp-jax's own matmul peak (update_mfu_best_peak: against the best peak of "
                                    "either framework)")
    return out


# ---------------------------------------------------------------- the console table

def _fmt(value, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    if abs(value) >= 1e4:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def format_table(r: dict[str, Any]) -> str:
    m, model, s = r["machine"], r["model"], r["shapes"]
    torch = r.get("torch")
    lines = [
        f"rlp-jax bench on {m['backend']} ({m['device_kind'] + ', ' if m['backend'] != 'cpu' else ''}"
        f"{m['cpu']}, {m['cores_used']} cores), jax {m['jax']}"
        + (f", torch {torch['torch']} on {torch['device']} ({torch['threads']} threads), transformers {torch['transformers']}"
           if torch else ", PyTorch skipped"),
        f"load average (1/5/15 min) before {m['load_before']}, after {m['load_after']}",
        f"model {model['name']} ({model['dtype']}, remat {model['config']['remat']}"
        + (f", Nemotron-H hybrid, layers {model['config']['pattern']}" if model.get("hybrid") else "")
        + f"): {model['num_params']:,} params, "
        f"{model['matmul_params']:,} in body matmuls; step B={s['batch']} G={s['rollouts']} "
        f"context {s['context']} thought {s['thought']}; decode prompt {s['decode_prompt']} "
        f"+ {s['decode_new']} new; median of up to {s['repeats']} calls"
        + (f" ({s['settled_after']} once their median is within {s['settled_within']:.0%} of the fastest)"
           if s["repeats"] > s["settled_after"] else ""),
    ]
    if torch:
        lines.append(f"identical weights: max |logit rlp-jax − HF| = {torch['max_abs_logit_diff']:.2e}")
    rows: list[tuple[str, str, str, str]] = []
    bw = r["bandwidth"]
    rows.append((f"memory bandwidth: read / in-place copy (GB/s, {bw['bytes'] / 2**20:.0f} MiB)",
                 f"{bw['read_bytes_per_s'] / 1e9:.1f} / {bw['copy_bytes_per_s'] / 1e9:.1f}", "", ""))
    roof = r["roofline"]
    for key, label in (("f32", "matmul peak f32 (GFLOP/s)"), ("bf16", "matmul peak bf16→f32 (GFLOP/s)")):
        theirs = roof.get("torch", {}).get(key, {}).get("peak_gflops")
        ours = roof["jax"][key]["peak_gflops"]
        rows.append((label, _fmt(ours), _fmt(theirs), _fmt(ours / theirs, 2) if theirs else "-"))
    upd = r["update"]["jax"]
    tu = r["update"].get("torch", {})
    ratio = r.get("ratios", {})
    rows += [
        ("fwd+bwd tokens/s", _fmt(upd["fwd_bwd_tokens_per_s"]), _fmt(tu.get("fwd_bwd_tokens_per_s")),
         _fmt(ratio.get("fwd_bwd"), 2)),
        ("fwd+bwd model GFLOP/s (MFU)", f"{_fmt(upd['fwd_bwd_gflops'])} ({upd['fwd_bwd_mfu']:.0%})",
         _fmt(tu.get("fwd_bwd_gflops")) + (f" ({tu['fwd_bwd_gflops'] / upd['peak_gflops']:.0%})" if tu else ""), ""),
        ("update (fwd+bwd+AdamW+EMA) tokens/s", _fmt(upd["update_tokens_per_s"]), "", ""),
        ("update MFU", f"{upd['update_mfu']:.1%}", "", ""),
        ("update MFU vs best peak (either framework)",
         f"{upd['update_mfu_best_peak']:.1%}" if "update_mfu_best_peak" in upd else "-", "", ""),
    ]
    notes = []
    for b, ours in r["decode"]["jax"].items():
        theirs = r["decode"].get("torch", {}).get(b, {})
        rows.append((f"decode tokens/s, batch {b}", _fmt(ours["decode_tokens_per_s"]),
                     _fmt(theirs.get("decode_tokens_per_s")), _fmt(ratio.get(f"decode_b{b}"), 2)))
        fraction = ours.get("bandwidth_fraction")
        rows.append(("  ms per step; MB it must read; of bandwidth", f"{_fmt(ours['decode_ms_per_step'], 2)}; "
                     f"{ours['step_bytes'] / 1e6:.0f}; " + ("-" if fraction is None else f"{fraction:.0%}"),
                     _fmt(theirs.get("decode_ms_per_step"), 2), ""))
        rows.append((f"  prefill tokens/s ({b} × {ours['prompt']}; s per call)",
                     f"{_fmt(ours['prefill_tokens_per_s'])} ({ours['prefill']['median_s']:.3g})",
                     f"{_fmt(theirs['prefill_tokens_per_s'])} ({theirs['prefill']['median_s']:.3g})" if theirs else "-",
                     _fmt(ratio.get(f"prefill_b{b}"), 2)))
        rows.append(("  generate incl. prefill tokens/s", _fmt(ours["generate_tokens_per_s"]),
                     _fmt(theirs.get("generate_tokens_per_s")), _fmt(ratio.get(f"generate_b{b}"), 2)))
        for side, d in (("rlp-jax", ours), ("PyTorch", theirs)):
            notes += [f"{side} batch {b} {note}" for note in d.get("notes", [])]
        parts = ours.get("step_bytes_parts", {})
        if "recurrent_state" in parts:  # the hybrid: what those bytes are
            rows.append(("  MB: weights / Mamba conv+SSM state / attention KV",
                         " / ".join(f"{parts[k] / 1e6:.2f}" for k in ("weights", "recurrent_state", "kv")), "", ""))
    width = max(len(row[0]) for row in rows) + 2
    head = f"{'':{width}}{'rlp-jax':>16}{'PyTorch':>16}{'ratio':>8}"
    lines += ["", head] + [f"{a:{width}}{b:>16}{c:>16}{d:>8}" for a, b, c, d in rows]

    st = r["step"]
    lines += ["", f"RLP step ({s['rows']} thoughts × {s['thought']} tokens): {st['step_s'] * 1e3:.1f} ms, "
              f"{st['thought_tokens_per_s']:,.0f} thought tokens/s"]
    for name, key in (("rollout (sampling)", "rollout_s"), ("scoring on the extended cache", "scoring_s"),
                      ("EMA no-think baseline", "ema_baseline_s"), ("update", "update_s"),
                      ("other (rewards, metrics, glue)", "other_s")):
        lines.append(f"  {name:34}{st[key] * 1e3:10.1f} ms {st[key] / st['step_s']:7.1%}")
    lines.append(f"  (cross-check: sample_and_score − rollout = "
                 f"{st['scoring_in_sample_and_score_s'] * 1e3:.1f} ms)")
    for name, prof in r.get("profile", {}).items():
        lines += ["", f"profile of {name}: costliest XLA operations (one call, {prof['trace']})"]
        for op in prof["ops"][:10]:
            lines.append(f"  {op['ms']:9.1f} ms {op['calls']:5d}×  {op['name']:36} {prof['what'].get(op['name'], '')}")
    if notes:
        lines += ["", "noisy timings:"] + [f"  {note}" for note in notes]
    lines.append("")
    for name, aim in r["aims"].items():
        verdict = f"n/a ({aim['why']})" if aim["met"] is None else ("met" if aim["met"] else "MISSED")
        value = "-" if aim["value"] is None else f"{aim['value']:.3g}"
        lines.append(f"aim {name}: {value} (aim {aim['aim']:g}) {verdict}")
    return "\n".join(lines)
