"""A run dir's config.yaml (the composed config pipeline.train saved), read back by the programs that work on a run
dir: pipeline.evaluate (the run's data and W&B settings) and tools/sync_wandb.py (its W&B project)."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf


def read_run_config(run_dir: Path, sections: tuple[str, ...] = ()) -> DictConfig:
    """run_dir/config.yaml, which must hold each of `sections` as a mapping. ValueError with one line saying why it
    cannot be used: missing, unreadable, not YAML, or without a section."""
    import yaml
    from omegaconf.errors import OmegaConfBaseException

    try:
        cfg = OmegaConf.load(run_dir / "config.yaml")
        if not isinstance(cfg, DictConfig):
            raise ValueError("it is not a mapping of settings")
        for name in sections:
            if not isinstance(cfg.get(name), DictConfig):
                raise ValueError(f"it has no {name} settings")
    except (OSError, ValueError, yaml.YAMLError, OmegaConfBaseException) as err:  # UnicodeDecodeError: a ValueError
        raise ValueError(f"run dir {run_dir}: config.yaml cannot be read: {' '.join(str(err).split())}") from None
    return cfg
