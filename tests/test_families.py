"""One decoder interface for every model family (issue #26): the registry's lookups, every family's
config through model_config.json and back, and the source rules that keep the library honest to
it — no module outside rlp_jax/models tests a model's or a config's type, no module reaches into
another's `_private` names, and no two rlp_jax modules import each other (directly or round a
longer loop; imports inside functions count)."""

import ast
import dataclasses
import json
from pathlib import Path

import pytest

from rlp_jax.models import convert, families
from rlp_jax.models.safetensors_io import HFFormatError

PACKAGE = Path(__file__).parent.parent / "rlp_jax"
# The model classes whose type the library outside rlp_jax/models must never test.
MODEL_TYPES = {"Transformer", "NemotronH", "ModelConfig", "NemotronHConfig", "DecodeWeights"}


def modules() -> dict[str, Path]:
    """Every module of the package by its dotted name (a package by its __init__.py)."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


MODULES = modules()


def imported(name: str, tree: ast.Module) -> list[tuple[ast.AST, str, str, str | None]]:
    """(node, local name, module, name imported from it or None) for every import anywhere in the
    module; a name that is itself a module of the package counts as that module."""
    package = name if MODULES[name].name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node, alias.asname or alias.name.split(".")[0], alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([node.module] if node.module else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                local = alias.asname or alias.name
                out.append((node, local, full, None) if full in MODULES else (node, local, base, alias.name))
    return out


def import_graph() -> dict[str, set[str]]:
    graph = {}
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text())
        graph[name] = {module for _, _, module, _ in imported(name, tree) if module in MODULES and module != name}
    return graph


def test_the_registry_finds_each_family_by_name_hf_type_json_tag_and_preset():
    assert [f.name for f in families.FAMILIES] == ["transformer", "nemotron_h"]
    assert families.DEFAULT is families.family_named("transformer")
    for family in families.FAMILIES:
        assert families.family_named(family.name) is family
        for model_type in family.hf_model_types:
            assert families.family_for_hf_model_type(model_type) is family
        for tag in family.json_tags:
            assert families.family_for_json_tag(tag) is family
        for name, config in family.presets.items():
            assert families.family_for_preset(name) is family and families.family_of(config) is family
            assert isinstance(config, family.config_type)
    assert families.family_for_hf_model_type("qwen3").hf_model_types == ("qwen3", "llama")
    assert families.family_for_hf_model_type("nemotron_h").name == "nemotron_h"
    with pytest.raises(HFFormatError, match="model_type 'gpt2' is not supported; rlp-jax reads 'qwen3', "
                                            "'llama' and 'nemotron_h' checkpoints"):
        families.family_for_hf_model_type("gpt2")
    with pytest.raises(ValueError, match="model family 'mamba' is unknown"):
        families.family_named("mamba")
    with pytest.raises(TypeError, match="not the config, model or sampler weights of a registered model family"):
        families.family_of(object())


@pytest.mark.parametrize("family", families.FAMILIES, ids=lambda f: f.name)
def test_every_family_round_trips_its_configs_through_model_config_json(family):
    for name, config in family.presets.items():
        resolved = config.replace(platform="gpu")  # a compilation detail: not written
        text = convert.config_to_json(resolved)
        fields = json.loads(text)
        # The file as it always was: `family` first, then the config's own fields in their order.
        own = [f.name for f in dataclasses.fields(config) if f.name not in ("family", "platform")]
        assert list(fields) == ["family"] + own, name
        assert fields["family"] == family.json_tag(config) and fields["family"] in family.json_tags
        assert convert.config_from_json(text) == config, name
        assert families.family_of(convert.config_from_json(text)) is family


def test_model_config_json_of_each_family_reads_as_it_always_did():
    qwen = convert.config_from_json(json.dumps({
        "family": "qwen3", "vocab_size": 256, "hidden_size": 64, "num_layers": 2, "num_heads": 4,
        "num_kv_heads": 2, "head_dim": 16, "intermediate_size": 128, "tie_embeddings": False,
        "rope_theta": 10000.0, "rms_norm_eps": 1e-06, "max_position_embeddings": 512, "rope_scaling": None,
        "param_dtype": "float32", "dtype": "float32", "remat": "none", "attention": "auto"}))
    assert families.family_of(qwen).name == "transformer" and qwen == families.DEFAULT.presets["tiny"]
    hybrid = families.family_named("nemotron_h").presets["nemotron-h-tiny"]
    text = convert.config_to_json(hybrid)
    assert text.startswith('{\n  "family": "nemotron_h",\n  "vocab_size": 256,')
    assert '"time_step_limit": [\n    0.0,\n    Infinity\n  ]' in text
    assert convert.config_from_json(text) == hybrid


def test_a_model_and_its_sampler_weights_know_their_family():
    from rlp_jax import sampling
    from rlp_jax.models import nemotron_h, transformer

    for model in (transformer.init_model(families.DEFAULT.presets["tiny"]),
                  nemotron_h.init_model(families.family_named("nemotron_h").presets["nemotron-h-tiny"])):
        family = families.family_of(model.config)
        assert isinstance(model, family.model_class) and families.family_of(model) is family
        assert families.family_of(sampling.weights_of(model)) is family
        assert type(family.abstract_model(model.config)) is family.model_class


def test_no_module_outside_models_tests_a_model_type():
    """Outside rlp_jax/models the library reaches a model family through the registry only: it
    neither imports a model or config class nor tests an object's type against one."""
    found = []
    for name, path in MODULES.items():
        if name.startswith("rlp_jax.models"):
            continue
        tree = ast.parse(path.read_text())
        for node, _, _, imported_name in imported(name, tree):
            if imported_name in MODEL_TYPES:
                found.append(f"{path.name}:{node.lineno} imports {imported_name}")
        for node in ast.walk(tree):
            checked = None
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and \
                    node.func.id in ("isinstance", "issubclass") and len(node.args) == 2:
                checked = node.args[1]
            elif isinstance(node, ast.Compare) and isinstance(node.left, ast.Call) and \
                    isinstance(node.left.func, ast.Name) and node.left.func.id == "type":
                checked = ast.Tuple(elts=node.comparators)
            if checked is None:
                continue
            names = {n.id for n in ast.walk(checked) if isinstance(n, ast.Name)} | \
                    {n.attr for n in ast.walk(checked) if isinstance(n, ast.Attribute)}
            if names & MODEL_TYPES:
                found.append(f"{path.name}:{node.lineno} tests a type against {sorted(names & MODEL_TYPES)}")
    assert not found, "; ".join(found)


def test_no_module_uses_another_modules_private_names():
    found = []
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text())
        aliases = {}  # a local name bound to a module of the package
        for node, local, module, imported_name in imported(name, tree):
            if not module.startswith("rlp_jax") or module == name:
                continue
            if imported_name is not None and imported_name.startswith("_") and not imported_name.startswith("__"):
                found.append(f"{name}:{node.lineno} imports {module}.{imported_name}")
            if imported_name is None and module in MODULES:
                aliases[local] = module
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases \
                    and node.attr.startswith("_") and not node.attr.startswith("__"):
                found.append(f"{name}:{node.lineno} uses {node.value.id}.{node.attr}")
    assert not found, "; ".join(found)


def test_no_import_cycles_among_rlp_jax_modules():
    graph = import_graph()
    assert "rlp_jax.models.families" in graph["rlp_jax.sampling"]  # the graph sees function-level imports too
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module):
        state[module] = 1
        path.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(target):] + [target]))
            if target not in state:
                visit(target)
        path.pop()
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)
