"""Config lint (as torchtune's test_configs): every preset composes against the schema, and every
`_target_` node's arguments fit its target's signature, building nothing."""
import inspect
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import get_method
from omegaconf import DictConfig, OmegaConf

from trainer.compose import CONFIG_DIR
from trainer.schema import register_configs

GROUPS = sorted(path.name for path in Path(CONFIG_DIR).iterdir() if path.is_dir())  # every folder is a group
PRESETS = [(group, path.stem) for group in GROUPS for path in sorted(Path(CONFIG_DIR, group).glob("*.yaml"))]
# Arguments ftlab passes at instantiate time, beside those in the config.
RUNTIME_KWARGS = {"backbone.load": {"cache_dir"}, "logger": {"run_dir", "name", "run_config"},
                  "optim": {"params", "lr"}, "scheduler": {"optimizer", "total_steps"}}


def compose_with(*overrides: str) -> DictConfig:
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=False)


def target_nodes(node, path=""):
    if isinstance(node, DictConfig):
        if "_target_" in node:
            yield path, node
        for key in node:
            child = node._get_node(key)
            if isinstance(child, DictConfig):
                yield from target_nodes(child, f"{path}.{key}" if path else str(key))


def test_every_group_has_presets_and_a_slot_and_every_slot_a_group():
    found = {group for group, _ in PRESETS}
    assert found == set(GROUPS)
    defaults = OmegaConf.to_container(OmegaConf.load(Path(CONFIG_DIR) / "config.yaml").defaults)
    slots = {next(iter(entry)).removeprefix("optional ").strip() for entry in defaults if isinstance(entry, dict)}
    assert slots == set(GROUPS), "conf/config.yaml's defaults list and the conf/ folders disagree"


def test_the_qlora_preset_picks_the_paged_8bit_optimizer():
    assert compose_with("train=qlora").optim._target_ == "bitsandbytes.optim.PagedAdamW8bit"
    assert compose_with("train=fsdp-qlora").optim._target_ == "bitsandbytes.optim.PagedAdamW8bit"
    assert compose_with().optim._target_ == "torch.optim.AdamW"
    assert compose_with("train=qlora", "optim=adamw").optim._target_ == "torch.optim.AdamW"  # the user's choice wins


@pytest.mark.parametrize("group,preset", PRESETS, ids=[f"{g}={p}" for g, p in PRESETS])
def test_preset_composes_and_targets_fit_their_signatures(group, preset):
    extra = ["data=classify"] if group == "model" and preset != "gpt-3.5-turbo" else []
    cfg = compose_with(f"{group}={preset}", *extra)
    assert OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    for path, node in target_nodes(cfg):
        target = get_method(node._target_)
        arguments = {k for k in node if not k.startswith("_")} | RUNTIME_KWARGS.get(path, set())
        try:
            inspect.signature(target).bind_partial(**dict.fromkeys(arguments))
        except TypeError as error:
            pytest.fail(f"{group}={preset}: {path} → {node._target_}: {error}")


@pytest.mark.parametrize("preset,schema_class", [("train/default", "TrainConfig"), ("eval/default", "EvalConfig"),
                                                 ("generation/default", "GenerationConfig"), ("lora/default", "LoraConfig"),
                                                 ("server/default", "ServerConfig")])
def test_the_default_presets_and_the_schema_state_the_same_defaults(preset, schema_class):
    import trainer.schema

    written = OmegaConf.to_container(OmegaConf.load(Path(CONFIG_DIR) / f"{preset}.yaml"))
    typed = OmegaConf.to_container(OmegaConf.structured(getattr(trainer.schema, schema_class)), enum_to_str=True)
    written.pop("instructions", None)  # eval's long prompts are content, kept in the YAML alone
    drift = {key: (value, typed.get(key, "<not in the schema>")) for key, value in written.items()
             if typed.get(key, "<not in the schema>") != value}
    assert not drift, f"conf/{preset}.yaml and trainer/schema.py disagree (yaml, schema): {drift}"
    assert set(typed) - set(written) <= {"instructions"}, "a schema key missing from the preset"
