"""Session-wide test isolation.

torch.compile's on-disk cache (TorchInductor) is keyed on the machine, not on the
``ATEN_CPU_CAPABILITY`` it compiled for: kernels compiled by a default run were reused by a run
under ``ATEN_CPU_CAPABILITY=avx2`` (CI's first pass) and gave NaN logits there. Each test
session therefore compiles into a cache of its own (inherited by the CLI processes it starts),
unless the caller chose one.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="moealign-inductor-")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = _cache
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
