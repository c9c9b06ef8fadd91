"""A researcher's first run on their own text, through the real CLI in a folder of their own
(relative paths): docs/training.md's commands run exactly as written, a workdir is bound to its
run, and every bad input ends in one sentence with exit status 2 and nothing written."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "training.md"
# As a user runs the commands: one CPU device (conftest's 8 simulated devices made the same run
# 2.3× slower on two cores, for no extra coverage: the mesh paths have their own tests).
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": " ".join(
    [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f])}


def cli(cwd, *args, timeout=600, env=ENV):
    return subprocess.run([sys.executable, "-m", "rlp_jax.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)


def doc_commands() -> list[str]:
    """Every command line of the ```bash blocks of docs/training.md, in order (comments dropped)."""
    blocks = re.findall(r"```bash\n(.*?)```", DOC.read_text(), flags=re.S)
    lines = [line.split("  #")[0].strip() for block in blocks for line in block.splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def write_notes(path: Path) -> None:
    """Plain English text of many paragraphs: this repository's own docs."""
    text = "\n\n".join((REPO / "docs" / name).read_text() for name in ("training.md", "data.md", "losses.md"))
    path.write_text(text)


def write_tiny_hf_model(folder: Path, corpus: Path) -> None:
    """A random tiny Qwen3 in HF format with a BPE tokenizer.json (trained on `corpus`) that has
    `<think>` and `</think>` as special tokens, as Qwen3's has."""
    import tokenizers
    import torch
    import transformers

    folder.mkdir()
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<think>", "</think>"],
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus.read_text().split("\n\n"), trainer)
    tok.save(str(folder / "tokenizer.json"))
    config = transformers.Qwen3Config(vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                      max_position_embeddings=1024, tie_word_embeddings=True)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).float().save_pretrained(folder)


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """A user's folder with notes.txt and my-model/, after running docs/training.md's commands."""
    home = tmp_path_factory.mktemp("home")
    write_notes(home / "notes.txt")
    write_tiny_hf_model(home / "my-model", home / "notes.txt")
    results = []
    for command in doc_commands():
        args = command.split()
        assert args[0] == "rlp-jax", command
        results.append((command, cli(home, *args[1:])))
    return home, results


def test_every_command_of_the_training_doc_runs_as_written(home):
    _, results = home
    assert len(results) >= 6
    for command, result in results:
        assert result.returncode == 0, f"{command}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"


def test_the_doc_run_resumes_with_each_step_logged_once_and_evaluates_the_positions_asked(home):
    folder, _ = home
    run = folder / "runs" / "notes"
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, 13))
    evals = [json.loads(line) for line in (run / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [0, 10, 12]
    assert all(e["num_positions"] == 64 for e in evals)  # the text config's eval.num_positions
    final = json.loads((run / "eval_final.json").read_text())
    assert final["num_positions"] == final["num_positions_asked"] == 32 and "note" not in final
    identity = json.loads((run / "identity.json").read_text())
    assert identity["corpus"].startswith("local:") and identity["config"]["data.txt_documents"] == "paragraphs"
    assert load_file(str(run / "hf" / "model.safetensors"))  # export of a relative workdir


def test_a_run_exports_and_evaluates_on_another_device_count(home, tmp_path):
    """A run trained on one device, read by a process with eight (a laptop's run on a GPU host, or
    the reverse): its checkpoints are restored onto the reading process's device, not refused by
    Orbax for a topology mismatch."""
    folder, _ = home
    run = folder / "runs" / "notes"
    eight = {**os.environ, "JAX_PLATFORMS": "cpu"}  # conftest's 8 devices
    export = cli(folder, "export", "--workdir", "runs/notes", "--out", str(tmp_path / "hf"), env=eight)
    assert export.returncode == 0, export.stderr[-3000:]
    for name, array in load_file(str(tmp_path / "hf" / "model.safetensors")).items():
        np.testing.assert_array_equal(array, load_file(str(run / "hf" / "model.safetensors"))[name])
    evaluated = cli(folder, "eval", "--workdir", "runs/notes", "--positions", "4", "--out", str(tmp_path / "e"),
                    env=eight)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert json.loads((tmp_path / "e.json").read_text())["num_positions"] == 4


def test_the_exported_folder_has_the_byte_tokenizer_for_transformers(home):
    """`rlp-jax export` of a byte-tokenizer run writes a tokenizer that transformers reads, with the
    ids the run trained on (offset 4, <think> and </think> 2 and 3); the weights as readable as the rest."""
    import transformers

    from rlp_jax.data import ByteTokenizer

    folder, results = home
    hf_dir = folder / "runs" / "notes" / "hf"
    export = next(r for command, r in results if command.startswith("rlp-jax export"))
    assert "tokenizer.json" in export.stdout, export.stderr
    tok, auto = ByteTokenizer(), transformers.AutoTokenizer.from_pretrained(hf_dir)
    for text in ["Plain English.", "naïve café — 😀 ü€\n\tend", "2+2=<think>two and two</think>4"]:
        assert auto.encode(text) == tok.encode(text) and auto.decode(tok.encode(text)) == text
    modes = {p.name: p.stat().st_mode & 0o777 for p in hf_dir.iterdir()}
    assert set(modes) == {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"}
    assert len(set(modes.values())) == 1, modes  # not safetensors' own 0600


def test_console_output_is_readable(home):
    _, results = home
    out = "".join(r.stdout + r.stderr for _, r in results)
    assert "Downloading and preparing" not in out and "\x1b[" not in out and "Using custom data" not in out
    progress = [line for line in out.splitlines() if line.startswith("step ")]
    assert progress and not any("nan" in line for line in progress)
    train_out = results[0][1].stdout
    corpus_line = next(line for line in train_out.splitlines() if line.startswith("corpus "))
    assert re.fullmatch(r"corpus rlp_local_corpus/corpus: \d+ train, \d+ validation documents.*", corpus_line)
    assert train_out.rstrip().splitlines()[-1].startswith("done: step 10 in ")
    assert "metrics.jsonl" in train_out.splitlines()[-1] and "rlp-jax export --workdir" in train_out


def test_init_from_hf_uses_its_shapes_tokenizer_and_weights(home, tmp_path):
    """With learning rate 0 a run started from an HF folder exports that folder's weights exactly."""
    folder, _ = home
    result = cli(folder, "train", "--corpus", "notes.txt", "--init-from-hf", "my-model", "--workdir",
                 str(tmp_path / "lr0"), "--config.train.steps=1", "--config.train.learning_rate=0.0",
                 "--config.eval.num_positions=0")
    assert result.returncode == 0, result.stderr[-3000:]
    model = json.loads((tmp_path / "lr0" / "model_config.json").read_text())
    hf_config = json.loads((folder / "my-model" / "config.json").read_text())
    assert (model["hidden_size"], model["num_layers"], model["vocab_size"]) == (64, 2, hf_config["vocab_size"])
    assert cli(folder, "export", "--workdir", str(tmp_path / "lr0"), "--out", str(tmp_path / "hf")).returncode == 0
    want = load_file(str(folder / "my-model" / "model.safetensors"))
    got = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert want.keys() == got.keys()
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    other_tokenizer = cli(folder, "train", "--corpus", "notes.txt", "--init-from-hf", "my-model",
                          "--config.tokenizer=bytes", "--workdir", str(tmp_path / "bytes"))
    assert other_tokenizer.returncode == 2 and "comes with its own tokenizer.json" in other_tokenizer.stderr
    assert not (tmp_path / "bytes").exists()


def test_a_workdir_refuses_another_run_and_force_new_archives_it_whole(home, tmp_path):
    folder, _ = home
    shutil.copytree(folder / "runs" / "notes", tmp_path / "run")
    before = (tmp_path / "run" / "metrics.jsonl").read_bytes()
    other_model = cli(folder, "train", "--corpus", "notes.txt", "--workdir", str(tmp_path / "run"),
                      "--config.model.preset=tiny")
    assert other_model.returncode == 2 and "Traceback" not in other_model.stderr
    assert other_model.stderr.strip().count("\n") == 0
    assert "holds another run" in other_model.stderr and "model.preset: 'demo' → 'tiny'" in other_model.stderr
    edited = tmp_path / "notes.txt"
    edited.write_text((folder / "notes.txt").read_text() + "\n\nOne more paragraph.\n")
    other_corpus = cli(tmp_path, "train", "--corpus", "notes.txt", "--workdir", "run")
    assert other_corpus.returncode == 2 and "the corpus (its contents changed)" in other_corpus.stderr
    assert (tmp_path / "run" / "metrics.jsonl").read_bytes() == before  # nothing appended, nothing moved

    fresh = cli(tmp_path, "train", "--corpus", "notes.txt", "--workdir", "run", "--force-new",
                "--config.train.steps=1", "--config.eval.num_positions=0")
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    archived = list((tmp_path / "run" / "archive").iterdir())
    assert len(archived) == 1 and (archived[0] / "metrics.jsonl").read_bytes() == before
    assert {"checkpoints", "start_params", "eval.jsonl", "identity.json", "data"} <= {p.name for p in archived[0].iterdir()}
    assert [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()] == [1]


BAD_INPUTS = [
    # (files to write, arguments after `rlp-jax`, the sentence's telling part)
    ({}, ["train", "--corpus", "missing.txt", "--workdir", "runs/x"], "no corpus file matches"),
    ({"empty.txt": b""}, ["train", "--corpus", "empty.txt", "--workdir", "runs/x"], "no usable training documents"),
    ({"bin.txt": bytes(range(256)) * 8}, ["train", "--corpus", "bin.txt", "--workdir", "runs/x"],
     "dropped_invalid_utf8 1"),
    ({"notes.pdf": b"%PDF-1.4"}, ["train", "--corpus", "notes.pdf", "--workdir", "runs/x"],
     "is not a .txt, .jsonl, .jsonl.gz file"),
    ({"bad.jsonl": b'{"text": "fine"}\n{"text": broken\n'}, ["train", "--corpus", "bad.jsonl", "--workdir", "runs/x"],
     "bad.jsonl:2: malformed JSON"),
    ({"one.txt": b"A single paragraph and nothing else.\n"}, ["train", "--corpus", "one.txt", "--workdir", "runs/x"],
     "the corpus is a single document"),
    ({}, ["train", "--config", "demo", "--corpus", "notes.txt", "--config.tokenizer=bytes", "--workdir", "runs/x"],
     "data.strategy='marked' asks for positions of kind 'answer_start'"),
    ({}, ["train", "--corpus", "notes.txt", "--config.tokenizer=demo", "--workdir", "runs/x"],
     "tokenizer 'demo' cannot encode the corpus"),
    ({}, ["train", "--corpus", "notes.txt", "--config.data.validation_fraction=0.0", "--workdir", "runs/x"],
     "has no validation split for the held-out evaluation"),
    ({}, ["train", "--config", "base", "--config.model.preset=tiny", "--workdir", "runs/x"],
     "per device at its largest phase"),
    ({}, ["train", "--workdir", "runs/x", "--config", "text"], "data.corpus is empty; pass --corpus PATH"),
    ({}, ["train", "--workdir", "runs/x", "--config", "rlp_paper"], "pass --init-from-hf DIR or point"),
    ({}, ["export", "--workdir", "runs", "--out", "x"], "is not a run but holds runs"),
    ({}, ["export", "--workdir", "nowhere", "--out", "x"], "does not exist"),
    ({}, ["eval", "--workdir", "runs"], "is not a run but holds runs"),
]


@pytest.mark.parametrize("files, args, message", BAD_INPUTS, ids=[" ".join(a[:3]) for _, a, _ in BAD_INPUTS])
def test_bad_input_is_one_sentence_exit_2_and_writes_no_run(home, tmp_path, files, args, message):
    folder, _ = home
    shutil.copy(folder / "notes.txt", tmp_path / "notes.txt")
    (tmp_path / "runs" / "a").mkdir(parents=True)
    (tmp_path / "runs" / "a" / "model_config.json").write_text("{}")  # `runs` holds a run
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    result = cli(tmp_path, *args, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and result.stderr.strip().count("\n") == 0, result.stderr[-3000:]
    assert message in result.stderr, result.stderr
    assert not (tmp_path / "runs" / "x").exists() and not (tmp_path / "x").exists()  # not even a corpus


def test_debug_adds_the_traceback_of_a_user_error(home, tmp_path):
    result = cli(tmp_path, "--debug", "train", "--corpus", "missing.txt", "--workdir", "runs/x")
    assert result.returncode == 2 and "Traceback" in result.stderr and "no corpus file matches" in result.stderr


def test_every_flag_has_help_and_finite_choices_are_listed():
    import argparse

    from rlp_jax import cli as cli_lib

    parser = cli_lib.build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in commands.choices.items():
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"rlp-jax {name} {action.option_strings}: no help text"
    ablate = commands.choices["ablate"]
    assert next(a for a in ablate._actions if "--grid" in a.option_strings).choices == (
        "reward", "rollouts", "thought_len", "kl", "cpt")
    assert "docs/training.md" in parser.format_help() and "RLP: Reinforcement as a Pretraining Objective" in \
        parser.format_help()
