"""Composing ftlab's config outside `ftlab <verb>`, and writing values into it safely.

`ftlab <verb>` composes `conf/config.yaml` through `hydra.main`; the server, the dashboard and the
tests compose the same config here, through Hydra's compose API. Both the CLI and the server
build on this module, so neither imports the other.

Text put into a config is read by two parsers: Hydra's override grammar (`key=value` on a command
line) and OmegaConf's interpolation (`${...}` in any string value). `quote_value` makes a value
one literal Hydra string; `literal` makes a string that OmegaConf reads back as itself.
"""
import re
import threading
from pathlib import Path

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "conf")
_lock = threading.Lock()  # Hydra's global state: one composition at a time


def compose(overrides=()):
    """The config `ftlab <verb> <overrides>` would compose (one caller at a time; Hydra's state is global)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from trainer.schema import register_configs

    with _lock:
        register_configs()
        if GlobalHydra.instance().is_initialized():
            return hydra_compose(config_name="config", overrides=list(overrides))
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            return hydra_compose(config_name="config", overrides=list(overrides))


def quote_value(value: str) -> str:
    """`value` as a Hydra quoted string, unless the user already quoted it (for text typed on ftlab's own
    command line; a value that comes from anyone else goes into a config with `literal`, never as override text)."""
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return value
    escaped = re.sub(r"(\\+)(?='|$)", lambda match: match.group(1) * 2, value)
    return "'" + escaped.replace("'", "\\'").replace("${", "\\${") + "'"


def literal(text: str) -> str:
    """`text` escaped so that OmegaConf reads it back as exactly `text`: never an interpolation.

    OmegaConf resolves `${...}` in every string value; `\\${` is a literal `${`, and backslashes
    right before a `${` escape each other (`\\\\${x}` is one backslash, then x resolved). So each
    run of backslashes before a `${` is doubled, and one more backslash escapes the `${` itself.
    """
    return re.sub(r"(\\*)\$\{", lambda match: match.group(1) * 2 + "\\${", text)
