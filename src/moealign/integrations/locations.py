"""A local path or a Hugging Face Hub name: the one rule applied to every name before
``from_pretrained`` or ``datasets.load_dataset`` sees it.

transformers and datasets try the Hub for any name that is not an existing folder; offline that
is about a minute of retries before an error, for what was only a mistyped local path. A name
*looks local* when

* it exists (a folder or a file), or
* it starts with ``.``, ``/`` or ``~``, or holds ``\\``, or has more than one ``/`` or a
  trailing one (a Hub id is ``name`` or ``org/name``), or
* its first component is an existing folder (``runs/x`` where ``runs/`` is here): a path inside
  a folder of this machine, not a Hub organisation.

A name that looks local and does not exist is refused at once (:class:`ConfigError` naming the
field and the path); the Hub is only asked for ``name`` or ``org/name`` with no such folder.
"""

from __future__ import annotations

import os
from pathlib import Path

from moealign.config import ConfigError

__all__ = ["looks_local", "pretrained_location"]


def looks_local(name: str | os.PathLike) -> bool:
    """True when ``name`` can only mean a path on this machine (the rules above)."""
    text = os.fspath(name)
    if not isinstance(name, str) or Path(text).expanduser().exists():
        return True
    return (
        text.startswith((".", "/", "~"))
        or "\\" in text
        or text.count("/") > 1
        or text.endswith("/")
        or ("/" in text and Path(text.split("/", 1)[0]).is_dir())
    )


def pretrained_location(name: str | os.PathLike, field: str) -> str:
    """What to give ``from_pretrained``/``load_dataset`` for ``name``: the local path (``~``
    expanded), or ``name`` itself for a Hub id; :class:`ConfigError` naming ``field`` when
    ``name`` looks local and does not exist."""
    if not looks_local(name):
        return os.fspath(name)
    path = Path(name).expanduser()
    if not path.exists():
        raise ConfigError(
            field,
            f"got {os.fspath(name)!r}, a local path that does not exist (a Hugging Face Hub name "
            "is 'name' or 'org/name')",
        )
    return str(path)
