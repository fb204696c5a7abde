"""A local path or a Hugging Face Hub name: the one rule applied to every name before
``from_pretrained`` or ``datasets.load_dataset`` sees it.

transformers and datasets try the Hub for any name that is not an existing folder; offline that
is about a minute of retries before an error, for what was only a mistyped local path. A name
*looks local* when

* it exists (a folder or a file), or
* it starts with ``.``, ``/`` or ``~``, or
* it holds a path separator (``/`` or ``\\``): ``runs/model``, ``hf/missing``.

A name that looks local and does not exist is refused at once (:class:`ConfigError` naming the
field and the path). The Hub is asked only for a bare ``name`` (``gpt2``) or for a name written
with the prefix :data:`HUB_PREFIX` (``hub:org/name``): a Hub id with an organisation holds a
``/`` like a path, and a path must never reach the Hub, so the Hub is what has to be said.
"""

from __future__ import annotations

import os
from pathlib import Path

from moealign.config import ConfigError

__all__ = ["HUB_PREFIX", "looks_local", "pretrained_location"]

HUB_PREFIX = "hub:"


def looks_local(name: str | os.PathLike) -> bool:
    """True when ``name`` can only mean a path on this machine (the rules above)."""
    text = os.fspath(name)
    if not isinstance(name, str) or Path(text).expanduser().exists():
        return True
    if text.startswith(HUB_PREFIX):
        return False
    return text.startswith((".", "/", "~")) or "/" in text or "\\" in text


def pretrained_location(name: str | os.PathLike, field: str) -> str:
    """What to give ``from_pretrained``/``load_dataset`` for ``name``: the local path (``~``
    expanded), or the Hub id (``name``, or what follows ``hub:``); :class:`ConfigError` naming
    ``field`` when ``name`` looks local and does not exist."""
    if not looks_local(name):
        return os.fspath(name).removeprefix(HUB_PREFIX)
    path = Path(name).expanduser()
    if not path.exists():
        raise ConfigError(
            field,
            f"got {os.fspath(name)!r}, a local path that does not exist (a Hugging Face Hub "
            f"model or data set is 'name' or '{HUB_PREFIX}org/name')",
        )
    return str(path)
