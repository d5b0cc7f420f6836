"""Replay evaluations on a second engine, in a thread beside the replay.

Why: a synchronous replay alternates serving (this process, one torch thread) and training
(the backend child, one thread), so on a 2-core machine one core is idle at any moment.
Evaluated inline, the 7 evaluations of a 36-turn replay paused it for 160-230 s of its
560-850 s (docs/replay.md, Session 8). Here they run on that idle core.

Contract
- :meth:`BackgroundEvaluator.submit` ``(turn, system_prompt)`` first waits for the evaluation
  before it (one evaluation engine), then copies the serving engine's weights and version as
  they are at that moment (:meth:`LocalEngine.copy_weights_from`) and returns; the greedy
  replies are decoded in a thread. Deltas the serving engine takes afterwards do not reach
  the copy, so each evaluation is of the version served at its turn, as inline.
- The replies equal those of an inline evaluation of the same version: the same weights go
  through the same greedy code (tested in tests/test_sim.py, and scripts/bench_eval.py
  checks a run's last evaluation against a fresh one).
- :meth:`results` waits for every submitted evaluation and returns them in turn order; an
  evaluation that raised re-raises there. :meth:`close` stops waiting (Ctrl-C): what finished
  is kept.
"""

from __future__ import annotations

import threading
from typing import Callable


class BackgroundEvaluator:
    def __init__(self, serving, make_engine: Callable[[], object], evaluate: Callable[[object, int, str], object]):
        """``serving``: the replay's engine; ``make_engine()`` builds the evaluation engine (same
        model and dtype); ``evaluate(engine, turn, system_prompt)`` runs one evaluation and
        returns its result (written to disk by the caller's function, in the worker thread)."""
        self.serving = serving
        self.engine = make_engine()
        self.evaluate = evaluate
        self._thread: threading.Thread | None = None
        self._done: list[tuple[int, object]] = []
        self._error: BaseException | None = None

    def submit(self, turn: int, system_prompt: str) -> None:
        self._join()
        self.engine.copy_weights_from(self.serving)

        def work() -> None:
            try:
                self._done.append((turn, self.evaluate(self.engine, turn, system_prompt)))
            except BaseException as e:  # noqa: BLE001 - handed to the replay's thread in results()
                self._error = e

        self._thread = threading.Thread(target=work, name=f"eval-turn-{turn}", daemon=True)
        self._thread.start()

    @property
    def finished(self) -> list:
        """Results of the evaluations finished so far, in turn order (does not wait)."""
        return [r for _, r in sorted(self._done, key=lambda x: x[0])]

    def results(self) -> list:
        self._join()
        return self.finished

    def _join(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            err, self._error = self._error, None
            raise err

    def close(self) -> None:
        """Stop waiting: an evaluation still running is abandoned (daemon thread)."""
        self._thread = None
