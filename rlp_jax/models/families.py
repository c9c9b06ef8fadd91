"""The registry of model families (rlp_jax.models.family.ModelFamily): one line per family below,
and the lookups every other module uses instead of testing a model's or a config's type."""

from __future__ import annotations

from typing import Any

from rlp_jax.models import nemotron_h_family, transformer_family
from rlp_jax.models.family import ModelFamily
from rlp_jax.models.safetensors_io import HFFormatError

# Every family, one line each. The first is the default: what a model_config.json whose `family`
# no family claims is read as, and whose presets a `model.preset` that no family names is looked
# up in (for its error message).
FAMILIES: tuple[ModelFamily, ...] = (
    transformer_family.FAMILY,
    nemotron_h_family.FAMILY,
)
DEFAULT = FAMILIES[0]


def _check_registry() -> None:
    for what, keys in (("name", lambda f: (f.name,)), ("HF model_type", lambda f: f.hf_model_types),
                       ("model_config.json family", lambda f: f.json_tags), ("preset", lambda f: tuple(f.presets))):
        seen: dict[str, str] = {}
        for family in FAMILIES:
            for key in keys(family):
                if key in seen:
                    raise ValueError(f"{what} {key!r} belongs to both the {seen[key]} and the {family.name} family; "
                                     "give each family its own.")
                seen[key] = family.name


_check_registry()


def family_named(name: str) -> ModelFamily:
    """The family registered as `name` (`transformer`, `nemotron_h`)."""
    for family in FAMILIES:
        if family.name == name:
            return family
    raise ValueError(f"model family {name!r} is unknown; choose one of {', '.join(f.name for f in FAMILIES)}.")


def family_of(config_or_model: Any) -> ModelFamily:
    """The family of a config, or of anything that carries one as `.config` (a model, a sampler's
    weights)."""
    for thing in (config_or_model, getattr(config_or_model, "config", None)):
        for family in FAMILIES:
            if isinstance(thing, family.config_type):
                return family
    raise TypeError(f"{type(config_or_model).__name__} is not the config, model or sampler weights of a "
                    f"registered model family ({', '.join(f.name for f in FAMILIES)}).")


def family_for_hf_model_type(model_type: str | None) -> ModelFamily:
    """The family that reads HF folders whose config.json has this `model_type`."""
    for family in FAMILIES:
        if model_type in family.hf_model_types:
            return family
    known = [repr(t) for family in FAMILIES for t in family.hf_model_types]
    raise HFFormatError(f"model_type {model_type!r} is not supported; rlp-jax reads {', '.join(known[:-1])} "
                        f"and {known[-1]} checkpoints.")


def family_for_json_tag(tag: str | None) -> ModelFamily:
    """The family of a model_config.json that records `family: tag` (the default family for a tag
    no family claims, as files written before there were several families)."""
    for family in FAMILIES:
        if tag in family.json_tags:
            return family
    return DEFAULT


def family_for_preset(name: str) -> ModelFamily:
    """The family with a preset named `name` (the default family, whose `preset` then names the
    choices, when none has)."""
    for family in FAMILIES:
        if name in family.presets:
            return family
    return DEFAULT
