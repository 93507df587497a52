"""One redaction for everything the project says or writes: log lines, errors, metric labels, and every
file (config.yaml, meta.json, sampling.json, result JSON, discovery files, metrics.jsonl).

Removed: credentials in URLs (`scheme://user:secret@host`), query strings of URLs (presigned signatures,
tokens), and the values of secret-bearing environment variables (AWS_SECRET_ACCESS_KEY, *_TOKEN, ...)
wherever they appear, so a credential taken from the environment is never copied into a file."""

from __future__ import annotations

import json
import logging
import os
import re

_URL = re.compile(
    r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/\s@'\"]*@)?(?P<rest>[^\s'\"?#]*)"
    r"(?P<query>\?[^\s'\"#]*)?"
)
_SECRET_ENV = re.compile(r"(SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL|SESSION|API_KEY|ACCESS_KEY)", re.I)
MIN_SECRET_LEN = 8  # shorter values ("test", "1") would blank out ordinary words


def _env_secrets() -> list[str]:
    values = {v for k, v in os.environ.items() if _SECRET_ENV.search(k) and len(v) >= MIN_SECRET_LEN}
    return sorted(values, key=len, reverse=True)


def redact(text: str) -> str:
    """`text` with URL credentials, URL query strings and secret environment values removed."""
    text = _URL.sub(lambda m: m.group("scheme") + m.group("rest"), str(text))
    for secret in _env_secrets():
        text = text.replace(secret, "<redacted>")
    return text


def redact_data(value):
    """A JSON/YAML-like structure with every string redacted (keys too)."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {redact_data(k): redact_data(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact_data(v) for v in value)
    return value


def to_json(value, **kwargs) -> str:
    """json.dumps of the redacted value: how every JSON file the project writes is made."""
    return json.dumps(redact_data(value), **kwargs)


class RedactingFormatter(logging.Formatter):
    """Redacts the whole formatted record: message, arguments and any traceback."""

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))
