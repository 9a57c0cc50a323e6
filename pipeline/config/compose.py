"""Composing configs outside @hydra.main (tests, tools, the pre-check of the entry points), and error messages
that say which key is wrong and which keys would have been valid.

Hydra already rejects an unknown key (the schemas are strict) and lists the options of a config group, but its
message for a mistyped key names only the key ("Key 'lrr' not in 'OptimizerConfig'"). `explain` walks the
exception's causes to OmegaConf's error, which knows the full key and the dataclass it was looked up in, and adds
that dataclass's fields.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from pipeline.config import schema
from pipeline.config.checks import ConfigError, check_launch, check_shards, check_values, data_roles
from pipeline.exit_codes import BAD_CONFIG, exit_with
from pipeline.redact import redact

CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "configs")
VERSION_BASE = "1.3"


def _unknown_key(full_key: str, schema: type) -> str:
    parent = full_key.rpartition(".")[0] or "<top level>"
    valid = ", ".join(f.name for f in dataclasses.fields(schema))
    return f"unknown config key '{full_key}': '{parent}' ({schema.__name__}) has the keys {valid}"


def explain(err: BaseException) -> str:
    """The reason for a composition failure; for an unknown key, the key and the valid ones."""
    messages, cause = [], err
    while cause is not None:
        if isinstance(cause, OmegaConfBaseException) and getattr(cause, "full_key", None):
            schema = getattr(cause, "object_type", None)
            if isinstance(cause, (ConfigKeyError, ConfigAttributeError)) and dataclasses.is_dataclass(schema):
                return _unknown_key(cause.full_key, schema)
            return f"invalid value for '{cause.full_key}': {str(cause).splitlines()[0]}"
        text = str(cause).split("Config search path:")[0].strip()
        if text and text not in messages:
            messages.append(text)
        cause = cause.__cause__ or cause.__context__
    return "\n".join(messages)


def check_keys(cfg: DictConfig, path: str = "") -> None:
    """Every key of every schema-typed node is a field of its dataclass. Hydra's `+key=value` appends keys even to
    structured nodes; a trainer that ignored them would run with a setting the user believes is on."""
    schema = OmegaConf.get_type(cfg)
    fields = {f.name: f for f in dataclasses.fields(schema)} if dataclasses.is_dataclass(schema) else None
    for key in cfg.keys():
        full_key = f"{path}.{key}" if path else str(key)
        if fields is not None and key not in fields:
            raise ConfigError(_unknown_key(full_key, schema))
        child = cfg._get_node(key)
        if isinstance(child, DictConfig) and dataclasses.is_dataclass(OmegaConf.get_type(child)):
            check_keys(child, full_key)


def load(config_name: str = "train", overrides: list[str] | tuple[str, ...] = (), resolve: bool = True,
         allow_missing: bool = False) -> DictConfig:
    """Compose configs/<config_name>.yaml with Hydra's override syntax, as the entry points would, and check its
    values; raises ConfigError naming the bad key and what is allowed, or the values still missing (???) unless
    `allow_missing`."""
    schema.register()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base=VERSION_BASE):
            cfg = compose(config_name=config_name, overrides=list(overrides))
        check_keys(cfg)
        missing = sorted(OmegaConf.missing_keys(cfg))
        if not missing:
            check_values(cfg)
        if resolve:
            OmegaConf.resolve(cfg)
    except ConfigError:
        raise
    except Exception as err:  # Hydra wraps OmegaConf errors in several exception types
        raise ConfigError(explain(err)) from err
    finally:
        GlobalHydra.instance().clear()
    if missing and not allow_missing:
        raise ConfigError(f"config values still missing (???): {', '.join(missing)}")
    return cfg


_FLAGS_WITH_VALUE = {"--config-name", "-cn", "--config-path", "-cp", "--config-dir", "-cd", "--cfg", "-c",
                     "--package", "-p", "--experimental-rerun", "--info", "-i"}


def cli_overrides(config_name: str, argv: list[str]) -> tuple[str, list[str]]:
    """The config name and the overrides of an entry point's command line, as Hydra will read them."""
    overrides, flag = [], None
    for arg in argv:
        if flag is not None:
            config_name = arg if flag in ("--config-name", "-cn") else config_name
            flag = None
        elif arg in _FLAGS_WITH_VALUE:
            flag = arg
        elif arg.startswith("--config-name="):
            config_name = arg.split("=", 1)[1]
        elif not arg.startswith("-"):
            overrides.append(arg)
    return config_name, overrides


def precheck_cli(config_name: str, argv: list[str]) -> str | None:
    """For a single run's command line: the reason its overrides do not compose or its run cannot start (values,
    world size, shards), or None. Multirun sweeps are left to Hydra (their comma lists are not single values). A
    command line that only prints (`--cfg`, `--info`) needs a valid config but no shards."""
    if "-m" in argv or "--multirun" in argv or any(a in ("--help", "-h", "--hydra-help") for a in argv):
        return None
    printing = any(a in ("--cfg", "-c", "--info", "-i") or a.startswith(("--cfg=", "--info=")) for a in argv)
    config_name, overrides = cli_overrides(config_name, argv)
    try:
        cfg = load(config_name, [o for o in overrides if not o.startswith(("hydra.", "hydra/", "+hydra", "~hydra"))],
                   allow_missing=printing)  # a printed config may show ??? where the run needs a value
        if not printing:
            check_run(config_name, cfg)
    except ConfigError as err:
        return str(err)
    return None


def check_run(config_name: str, cfg: DictConfig) -> None:
    """What a run of the entry point `config_name` needs beyond a valid config: its shards, and for training a
    global batch that this launch's world size divides and a device for ranks that share BatchNorm statistics."""
    if config_name == "train":
        from pipeline.device import DeviceError, resolve_device
        from pipeline.distributed import DistEnvError, resolve
        from pipeline.engine.batchnorm_groups import check_batchnorm_device

        try:
            env = resolve()
        except DistEnvError as err:
            raise ConfigError(f"launch environment: {err}") from None
        try:
            device = resolve_device(cfg.device, env.local_rank)
        except DeviceError as err:
            raise ConfigError(str(err)) from None
        check_launch(cfg, env.world_size)
        check_batchnorm_device(cfg.deepspeed, env.world_size, device)
        check_shards(cfg.data, data_roles(cfg))
    # evaluate checks its shards once it knows the data: an encoder of a run dir takes the run's (pipeline/evaluate.py)
    if config_name == "evaluate" and cfg.output:
        if Path(cfg.output).is_dir():
            raise ConfigError(f"output={cfg.output}: is a folder; name the JSON file to write")
        if not Path(cfg.output).parent.is_dir():
            raise ConfigError(f"output={cfg.output}: no folder {Path(cfg.output).parent}")


def exit_if_bad_cli(config_name: str, program: str) -> None:
    """Entry points call this before Hydra starts: a command line that does not compose exits BAD_CONFIG (2) with
    the reason."""
    problem = precheck_cli(config_name, sys.argv[1:])
    if problem:
        print(f"{program}: {redact(problem)}", file=sys.stderr)
        exit_with(BAD_CONFIG)
