"""UI responsiveness while a reply streams: key latency and Markdown renders, coalesced vs per-token.

Runs the real CompanionApp headless (Textual pilot) with a real model (default: the
converted SmolLM2-135M-Instruct; --model for another folder), sends one prompt,
types keys while the reply streams and measures how long each key takes to reach
the input. Baseline, same run: every token re-renders the whole reply as Markdown
(what the app would do without coalescing). Ends with one JSON line.

    .venv/bin/python scripts/bench_ui.py [--model PATH] [--tokens 200] [--keys 20]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


async def one_run(engine, params, n_keys: int, per_token: bool) -> dict:
    from textual import events

    from companion.journal import Journal
    from companion.tui.app import CompanionApp
    from companion.tui.widgets.message import ChatMessage
    from companion.tui.widgets.prompt_input import PromptInput

    if per_token:  # baseline: re-render the full reply on every token, from the UI thread
        orig_push = ChatMessage.push

        def push(self, piece):
            orig_push(self, piece)
            self.app.call_from_thread(self._full_render)

        def _full_render(self):
            self.renders += 1
            self.query_one(".body").update(self.text)

        ChatMessage.push, ChatMessage._full_render = push, _full_render
    try:
        journal = Journal(Path(tempfile.mkdtemp()) / "bench.db")
        app = CompanionApp(engine, params, journal=journal)
        latencies = []
        async with app.run_test(size=(110, 32)) as pilot:
            app.chat.query_one(PromptInput).value = "Write a long story about a dragon who learns to cook."
            await pilot.press("enter")
            while app.chat.streaming is None or not app.chat.streaming.text:
                await asyncio.sleep(0.01)
            prompt = app.chat.query_one(PromptInput)
            for i in range(n_keys):
                if app.chat.streaming is None:
                    break
                before, t0 = prompt.value, time.perf_counter()
                app.post_message(events.Key("x", "x"))
                while prompt.value == before:
                    await asyncio.sleep(0.001)
                latencies.append(time.perf_counter() - t0)
                await asyncio.sleep(0.1)
            while app.chat.streaming is not None:
                await asyncio.sleep(0.02)
            msg = app.chat.query(ChatMessage).last()
            n_tokens = len(journal.turns()[0]["token_ids"])
            return {"key_ms_mean": 1e3 * statistics.mean(latencies) if latencies else None,
                    "key_ms_max": 1e3 * max(latencies) if latencies else None, "keys": len(latencies),
                    "renders": msg.renders, "tokens": n_tokens}
    finally:
        if per_token:
            ChatMessage.push = orig_push


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--keys", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    import torch

    from companion.config import load_settings
    from companion.engine.local import GenParams, LocalEngine
    from companion.models import resolve_model_path

    torch.set_num_threads(args.threads)
    path = resolve_model_path(load_settings(model=args.model))
    engine = LocalEngine(path, dtype="bf16", threads=args.threads)
    params = GenParams(max_new_tokens=args.tokens, temperature=0)
    coalesced = asyncio.run(one_run(engine, params, args.keys, per_token=False))
    baseline = asyncio.run(one_run(engine, params, args.keys, per_token=True))
    for name, r in (("coalesced (app)", coalesced), ("per-token full render (baseline)", baseline)):
        print(f"{name:34s} key latency mean {r['key_ms_mean']:.1f} ms max {r['key_ms_max']:.1f} ms over {r['keys']} keys; "
              f"{r['renders']} Markdown renders for {r['tokens']} tokens")
    print(json.dumps({"model": path.name, "tokens": coalesced["tokens"],
                      "key_latency_ms_mean": round(coalesced["key_ms_mean"], 2),
                      "key_latency_ms_max": round(coalesced["key_ms_max"], 2),
                      "renders": coalesced["renders"],
                      "baseline_key_latency_ms_mean": round(baseline["key_ms_mean"], 2),
                      "baseline_key_latency_ms_max": round(baseline["key_ms_max"], 2),
                      "baseline_renders": baseline["renders"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
