"""Credentials in a URL never leave the command line: not in error lines, config.yaml, W&B's config, evaluation
results or log records."""

import logging
import os
import subprocess
import sys

from omegaconf import OmegaConf

from pipeline.redact import RedactingFilter, redact, redacted_config
from tests.helpers import REPO


def test_user_information_of_any_url_is_replaced():
    assert redact("s3://AKIA:s3cr3t@bucket/shards and https://u:p@host/x") == "s3://***@bucket/shards and https://***@host/x"
    assert redact("/plain/path s3://bucket/key user@example.org") == "/plain/path s3://bucket/key user@example.org"
    cfg = OmegaConf.create({"data": {"root": "gs://tok@b/x", "roots": ["s3://k:s@b"]}, "n": 1})
    assert redacted_config(cfg) == {"data": {"root": "gs://***@b/x", "roots": ["s3://***@b"]}, "n": 1}


def test_log_records_are_redacted():
    record = logging.LogRecord("x", logging.WARNING, __file__, 1, "reading %s failed", ("s3://k:secret@b/m.json",),
                               None)
    RedactingFilter().filter(record)
    assert record.getMessage() == "reading s3://***@b/m.json failed"


def test_an_error_about_a_url_with_credentials_does_not_echo_them(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pipeline.train", "experiment=smoke",
                           "data.root=s3://AKIAKEY:s3cr3t@bucket/digits"], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2
    assert "s3cr3t" not in proc.stdout + proc.stderr and "s3://***@bucket/digits" in proc.stderr
