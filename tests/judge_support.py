"""Shared, process-wide judge objects for the judge and hint tests (no conftest edits needed).

MiniLM is loaded once per test process. The shared judge uses companion's
cache dir (``COMPANION_CACHE_DIR`` or ~/.cache/companion), so the encoder's top
layers are fine-tuned and the heads fitted once per machine (~70 s) and later
runs load them; the tuned encoder is also shared in memory by every judge of
the process (backend/judge/tune.py). The cold fit itself is tested on small
banks in test_judge.py and test_judge_tune.py. ``CACHE`` is a private temporary
cache for tests that write (feedback refits).
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

CACHE = Path(tempfile.mkdtemp(prefix="judge-cache-"))
atexit.register(shutil.rmtree, CACHE, True)


@functools.lru_cache(maxsize=None)
def featurizer():
    import torch
    torch.set_num_threads(1)
    from backend.judge.features import Featurizer
    return Featurizer()


@functools.lru_cache(maxsize=None)
def judge(m: int = 3):
    from backend.judge import load_judge
    return load_judge("embedding", m=m, featurizer=featurizer())
