"""`companion simulate`: replay a simulated persona against the whole system and report.

Each run writes ``<out>/<time>-<persona>-<method>/`` (report.json, turns.csv, plot.png,
summary.md, eval_replies/, backend.log). ``--compare M1 M2 ...`` runs several methods
with the same seed and writes ``<out>/<time>-<persona>-compare/`` with compare.md,
compare.json and one plot of all curves. The last stdout line is the report as JSON.
"""

from __future__ import annotations

import json
import time
from pathlib import Path


def register(sub, common) -> None:
    from companion.sim.replay import METHODS, REPLAY_TEMPERATURE

    p = sub.add_parser("simulate", parents=[common], help="replay a simulated persona and measure personalization",
                       description="Replay a simulated person (personas/*.toml) against the whole system: the local "
                       "engine serves, the person reacts, turns go through the journal and the link to a real backend "
                       "(judge + trainer), deltas come back. Evaluates on held-out eval tasks as it goes.")
    p.add_argument("--persona", default="student", help="persona name from personas/ or a path to a persona file (default student)")
    p.add_argument("--method", default="combined", choices=METHODS,
                   help="combined | binary | opd train the weights; none never learns; memory is a baseline that "
                   "appends learned hints to the system prompt (default combined)")
    p.add_argument("--compare", nargs="*", choices=METHODS, metavar="METHOD",
                   help=f"run several methods with the same seed and write a comparison table (no names: all of {', '.join(METHODS)})")
    p.add_argument("--turns", type=int, default=36, help="assistant replies to react to (default 36)")
    p.add_argument("--eval-every", type=int, default=6, help="evaluate every N turns and at turn 0 (default 6)")
    p.add_argument("--seed", type=int, default=0, help="seed: task order, reactions, sampling (default 0)")
    p.add_argument("--max-new-tokens", type=int, default=160, help="longest reply in tokens (default 160)")
    p.add_argument("--temperature", type=float, default=REPLAY_TEMPERATURE,
                   help=f"sampling temperature of training turns (default {REPLAY_TEMPERATURE}; evaluation is always greedy; "
                   "the chat's default; docs/replay.md, Session 10)")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling of training turns (default 0.9)")
    p.add_argument("--batch-size", type=int, default=4, help="samples per policy update (default 4)")
    p.add_argument("--judge", default="embedding", help="judge for backend.judge.load_judge (default embedding, the CPU judge; the llm judge needs an endpoint the replay backend does not pass yet)")
    p.add_argument("--judge-m", type=int, default=3, help="judge votes per turn (default 3)")
    p.add_argument("--trainer", metavar="JSON", default="{}", help="extra TrainerConfig fields as JSON, e.g. '{\"lr\": 5e-4}', over the "
                   "product's defaults (kl_coef 0.2; combined w_opd 0.5; docs/replay.md, Sessions 3, 10, 11)")
    g = p.add_argument_group("LLM roles (optional, any OpenAI-compatible endpoint)")
    g.add_argument("--llm-endpoint", metavar="URL", help="e.g. http://localhost:30000/v1")
    g.add_argument("--llm-model", default="default", help="model name sent to the endpoint")
    g.add_argument("--llm-user", action="store_true", help="an LLM words the simulated person's messages")
    g.add_argument("--llm-rater", action="store_true", help="an LLM also rates eval replies on 0-1 in steps of 0.25")
    p.add_argument("--no-sync", action="store_true", help="let the loops run free (product timing, not reproducible)")
    p.add_argument("--out", default="runs", help="folder for run outputs (default ./runs)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads for serving (default 1; 0 = every core, at most 4, when synchronous, since "
                   "serving and training then take turns, 1 with --no-sync)")
    p.add_argument("--backend-threads", type=int, default=0,
                   help="torch threads of the backend child, judge + trainer (default 0: every core, at most 4, "
                   "when synchronous, since serving waits while it trains; 1 with --no-sync)")
    p.add_argument("--inline-eval", action="store_true",
                   help="evaluate on the serving engine, pausing the replay (default: on a second engine beside it, "
                   "same replies, using the core that serving and training leave idle)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_run)


def _run(args) -> int:
    import os

    # Before torch loads OpenMP: idle threads sleep instead of spinning (the backend child gets the
    # same), so an eval or a turn's serving is not slowed by threads waiting in the other process.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from companion.cli import settings_from_args
    from companion.errors import UserError
    from companion.models import resolve_model_path
    from companion.sim.persona import load_persona
    from companion.sim.replay import METHODS, ReplayConfig, make_run_dir, run_replay
    from companion.sim import report as rep

    settings = settings_from_args(args)
    persona = load_persona(args.persona)
    model_path = resolve_model_path(settings)
    try:
        overrides = json.loads(args.trainer)
        assert isinstance(overrides, dict)
    except (ValueError, AssertionError):
        raise UserError("--trainer must be a JSON object, e.g. '{\"lr\": 5e-4}'.") from None
    from backend.stages import METHOD_WEIGHTS, method_trainer_overrides
    from backend.trainer.config import config_from_overrides

    methods = [args.method] if args.compare is None else (args.compare or list(METHODS))
    for method in methods:
        if method in METHOD_WEIGHTS:  # none and memory never train
            config_from_overrides(method_trainer_overrides(method, overrides))  # fail now, not at the first update
    chat = None
    if args.llm_user or args.llm_rater:
        if not args.llm_endpoint:
            raise UserError("--llm-user and --llm-rater need --llm-endpoint URL.")
        from companion.sim.llm import ChatEndpoint

        chat = ChatEndpoint(args.llm_endpoint, args.llm_model, api_key=os.environ.get("OPENAI_API_KEY"))
    reports = {}
    for method in methods:
        cfg = ReplayConfig(method=method, turns=args.turns, eval_every=args.eval_every, seed=args.seed,
                           max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                           batch_size=args.batch_size, sync=not args.no_sync,
                           judge=args.judge, judge_m=args.judge_m, threads=args.threads,
                           backend_threads=args.backend_threads, background_eval=not args.inline_eval,
                           trainer_overrides=overrides)
        run_dir = make_run_dir(Path(args.out), persona.name, method)
        from companion.sim.llm import LLMPersonaUser, LLMRater

        r = run_replay(persona, cfg, run_dir, model_path=model_path, system_prompt=settings.system_prompt,
                       dtype=settings.dtype, model=settings.model, progress=not args.quiet,
                       user=LLMPersonaUser(persona, args.seed, chat) if args.llm_user else None,
                       rater=LLMRater(chat) if args.llm_rater else None)
        reports[method] = r
        print(f"{persona.name}/{method}: score {r['base_score']:.3f} -> {r['final_score']:.3f}, "
              f"all-pass {r['base_all_pass']:.3f} -> {r['final_all_pass']:.3f}, "
              f"turns to 0.8: {r['turns_to_all_pass_0.8']}, wall {r['wall_s']:.0f} s  ({run_dir})")
    if args.compare is not None:
        cdir = Path(args.out) / f"{time.strftime('%Y%m%d-%H%M%S')}-{persona.name}-compare"
        cdir.mkdir(parents=True, exist_ok=True)
        (cdir / "compare.md").write_text(rep.compare_md(reports))
        (cdir / "compare.json").write_text(json.dumps(reports, indent=2, default=float))
        rep.plot_curves(cdir / "plot.png", reports, title=f"{persona.name}: methods compared (seed {args.seed})")
        print(rep.compare_md(reports))
        summary = {m: {k: r[k] for k in ("final_score", "final_all_pass", "base_all_pass", "turns_to_all_pass_0.8")}
                   for m, r in reports.items()}
        print(json.dumps(summary))
    else:
        r = next(iter(reports.values()))
        print(json.dumps({k: r[k] for k in ("persona", "method", "final_score", "final_all_pass", "base_all_pass",
                                            "turns_to_all_pass_0.8", "judge_agreement", "wall_s")}))
    return 0
