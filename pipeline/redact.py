"""Credentials never leave the command line: a URL's user information (`s3://KEY:SECRET@bucket/...`,
`https://user:pass@host/...`) is replaced by `***` wherever augssl writes or prints a URL: config.yaml, W&B's
config, evaluation results, error lines and log records. Prefer the storage's own credential mechanisms (the
environment, a profile) to credentials in a URL."""

from __future__ import annotations

import logging
import re
from typing import Any

from omegaconf import DictConfig, OmegaConf

_USERINFO = re.compile(r"(?<=://)[^/@\s]+@")


def redact(text: str) -> str:
    return _USERINFO.sub("***@", text)


def redact_tree(value: Any) -> Any:
    """Every string in a tree of dicts, lists and scalars, redacted."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: redact_tree(v) for k, v in value.items()}
    if isinstance(value, list):
        return [redact_tree(v) for v in value]
    return value


def redacted_config(cfg: DictConfig) -> dict:
    """The resolved config as plain Python, every URL redacted: what may be written down or logged."""
    return redact_tree(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True))


class RedactingFilter(logging.Filter):
    """A log handler's filter that redacts each record's message."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if _USERINFO.search(message):
            record.msg, record.args = redact(message), None
        return True


def redact_logs() -> None:
    """Redact every record the root logger's handlers emit (entry points call this once logging is set up)."""
    for handler in logging.getLogger().handlers:
        handler.addFilter(RedactingFilter())
