"""``finsynth``: one subcommand per stage, ``run`` for the Prefect pipeline, ``card`` and ``scores``.

A stage subcommand (``finsynth fetch``) runs that stage's plain function directly; ``finsynth run``
runs the Prefect pipeline flow (``--only STAGE`` / ``--from STAGE``). Both keep a stage whose output is
current (:func:`flows.stages.settle`: made from the same config, upstream content, input files, prompts
and code) and rerun it otherwise; ``--refresh`` reruns it anyway. Any failure exits non-zero with a
one-line reason (``--debug`` for the traceback).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import sqlite3
import sys
from contextlib import contextmanager
from pathlib import Path

from datagen.config import ConfigError, load_config
from datagen.faults import find
from datagen.io import is_rank_zero
from flows.lock import run_lock
from datagen.manifest import Manifest
from flows.stages import STAGE_NAMES, execute, get_stage


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", type=Path, help="a YAML config file (wins over --profile)")
    common.add_argument("--profile", default=None, help="a profile under configs/ (default: demo)")
    common.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set augment.k=2 (repeatable)")
    common.add_argument("--root", type=Path, default=None, help="project root for data/ (default: repo)")
    common.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    common.add_argument("--allow-stale", action="store_true",
                        help="let a stage read upstream output marked STALE (an earlier stage was rerun)")

    p = argparse.ArgumentParser(prog="finsynth", description=__doc__.splitlines()[0], parents=[common])
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", parents=[common], help="run the pipeline as a Prefect flow")
    run.add_argument("--only", choices=STAGE_NAMES, help="run this stage alone (reusing upstream outputs)")
    run.add_argument("--from", dest="start", choices=STAGE_NAMES, help="run from this stage on")
    run.add_argument("--json", action="store_true",
                     help="print the run summary as JSON (by default it goes to a file and the scores are printed)")
    run.add_argument("--refresh", action="store_true", help="rerun the stages even when their outputs are current")
    for name in STAGE_NAMES:
        one = sub.add_parser(name, parents=[common], help=f"run the {name} stage alone, without Prefect")
        one.add_argument("--refresh", action="store_true", help="rerun it even when its output is current")
    card = sub.add_parser("card", parents=[common], help="print the dataset card")
    card.add_argument("--path", type=Path, default=None, help="a dataset folder (default: the config's)")
    scores = sub.add_parser("scores", parents=[common], help="print per-category evaluation scores")
    scores.add_argument("run", nargs="?", default=None, help="an evaluation run folder or name")
    form = scores.add_mutually_exclusive_group()
    form.add_argument("--markdown", dest="fmt", action="store_const", const="markdown", default="text",
                      help="the Markdown tables of report.md (with pass rates)")
    form.add_argument("--json", dest="fmt", action="store_const", const="json", help="the table rows as JSON")
    sub.add_parser("config", parents=[common], help="print the validated configuration")
    ui = sub.add_parser("ui", parents=[common], help="the Prefect UI on the main command's database, until Ctrl-C")
    ui.add_argument("--home", type=Path, default=None,
                    help="PREFECT_HOME of the runs to show (default: .prefect/ in the repo, as scripts/demo.sh)")
    ui.add_argument("--port", type=int, default=None, help="port on 127.0.0.1 (default: 4200 if free; 0: any free)")
    ui.add_argument("--flow-run", default=None,
                    help="show this flow run's artifacts (default: the latest pipeline run)")
    chat = sub.add_parser("chat", parents=[common], help="chat with the tuned model in the terminal (transformers)")
    chat.add_argument("--base", action="store_true", help="the base model, without the adapter")
    export = sub.add_parser("export", parents=[common], help="export the tuned model (adapter, merged, GGUF)")
    export.add_argument("--format", dest="fmt", choices=["adapter", "merged", "gguf"], default="gguf",
                        help="adapter: PEFT folder; merged: safetensors, no PEFT; gguf: llama.cpp/Ollama (default)")
    export.add_argument("--type", dest="outtype", choices=["q8_0", "f16", "bf16", "f32"], default="q8_0",
                        help="GGUF tensor type (default q8_0)")
    export.add_argument("--out", type=Path, default=None,
                        help="output folder (default: data/models/exports/<train.run_name>/<format>)")
    sweep = sub.add_parser("sweep", parents=[common], help="run the pipeline once per grid point and compare them")
    sweep.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                       help="a config key and its values, e.g. augment.k=0,3 (repeatable: the product is run)")
    sweep.add_argument("--point", action="append", default=[], metavar="KEY=V[,KEY=V]",
                       help="one more point with several settings, e.g. the exposure-matched k=0 arm of a k=3 "
                            "comparison: --point augment.k=0,train.repeat=4")
    sweep.add_argument("--name", default="sweep", help="the comparison goes to data/reports/sweep-NAME/")
    sweep.add_argument("--refresh", action="store_true", help="rerun the stages even when their outputs are current")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = None
    try:
        cfg = load_config(args.config, profile=args.profile, overrides=args.overrides, root=args.root)
        if args.allow_stale:
            os.environ["FINSYNTH_ALLOW_STALE"] = "1"
        if args.command == "config":
            print(json.dumps(cfg.dump_public(), indent=2))
        elif args.command in ("run", "sweep"):
            # without PREFECT_API_URL Prefect starts a temporary local server; give it time on 2 busy cores
            os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
            with _terminal(args, cfg) as out:  # `out` (the terminal's stdout) is closed once this ends
                result = _run_flow(args)
                print(_ending(args, cfg, result), file=out or sys.stdout, flush=True)
        elif args.command == "ui":
            from flows.ui import default_home, serve

            return serve(args.home or default_home(), args.port, flow_run_id=args.flow_run)
        elif args.command == "chat":
            from datagen.prompts import load_prompt
            from training.generate import chat

            adapter = None if args.base else get_stage("train").output(cfg)
            if adapter is not None and not (adapter / "adapter_config.json").exists():
                raise FileNotFoundError(f"no adapter at {adapter}; run `finsynth train` (or the main command) first")
            system = load_prompt(cfg.format.system_prompt).render() if cfg.format.system_prompt else None
            with _terminal(args, cfg, announce=False) as out:  # logs, bars and warnings: to the log file
                say = out or sys.stdout
                print(f"chatting with {cfg.model.name_or_path}{'' if adapter is None else ' + ' + str(adapter)} "
                      "(exit or Ctrl-D to stop)", file=say, flush=True)
                chat(cfg.model, adapter, system, read=functools.partial(_ask, say),
                     write=functools.partial(print, file=say, flush=True))
        elif args.command == "export":
            from training.export import export

            print(json.dumps(export(cfg, args.fmt, args.out, args.outtype), indent=2))
        elif args.command == "card":
            path = (args.path or get_stage("format").output(cfg)) / "README.md"
            if not path.exists():
                raise FileNotFoundError(f"no dataset card at {path}; run `finsynth format` first")
            print(path.read_text(encoding="utf-8"))
        elif args.command == "scores":
            from training.report import scores_table

            print(scores_table(cfg, args.run, args.fmt))
        else:
            with run_lock(cfg.paths.root, cfg.llm.cache):
                manifest = execute(cfg, args.command, refresh=args.refresh)
            if is_rank_zero():  # under torchrun, rank 0 wrote the outputs and reports
                print(json.dumps(_summary(manifest), indent=2, default=str))
    except KeyboardInterrupt:
        print("finsynth: interrupted", file=sys.stderr)
        return 130
    except (ConfigError, FileNotFoundError, ValueError, RuntimeError, KeyError, OSError, sqlite3.DatabaseError) as e:
        # a fault of the machine (full disk, read-only root, corrupt or locked cache): one line naming
        # the stage, the path and what to do; another OSError or SQLite error is a bug: its traceback
        stage = args.command if args.command in STAGE_NAMES else None
        fault = find(e, stage=stage, path=_where(cfg, stage, args.root))
        if fault is None and isinstance(e, (OSError, sqlite3.DatabaseError)) and not isinstance(e, FileNotFoundError):
            raise
        if args.debug:
            raise
        print(f"finsynth: error: {fault or _one_line(e)}", file=sys.stderr)
        if _LOG["path"] is not None:
            print(f"  full log: {_LOG['path']} (--debug prints it here)", file=sys.stderr)
        return 2
    return 0


_LOG: dict[str, Path | None] = {"path": None}  # the log file of this command's run, once there is one


@contextmanager
def _terminal(args: argparse.Namespace, cfg, announce: bool = True):
    """A Prefect run (or a chat) in this process: with ``--debug`` everything reaches the terminal; otherwise
    the terminal shows the stage and progress lines (:mod:`flows.progress`) and the rest (library warnings,
    progress bars, Prefect's records and temporary server, handled tracebacks) goes to a log file, named on
    the terminal when ``announce``. Yields the terminal's stdout (None with ``--debug``)."""
    if args.debug:
        yield None
        return
    from flows.progress import log_file, quiet_terminal

    path = _LOG["path"] = log_file(cfg.paths.root, args.command)
    with quiet_terminal(path) as (out, terminal):
        if announce:
            terminal.line(f"finsynth {args.command}: full log in {path}")
        yield out


def _ask(out, prompt: str) -> str:
    """``input(prompt)`` with the prompt on ``out`` (the terminal, while fd 1 goes to the log file)."""
    out.write(prompt)
    out.flush()
    line = sys.stdin.readline()
    if not line:
        raise EOFError
    return line.rstrip("\n")


def _ending(args: argparse.Namespace, cfg, result: dict) -> str:
    """What ``finsynth run`` prints at its end: as the deployment does (:func:`flows.deploy.result_lines`),
    the score tables, a few answers and the paths; the result as JSON goes to a file next to the log (to the
    terminal instead with ``--json``). ``finsynth sweep`` prints its JSON."""
    text = json.dumps(result, indent=2, default=str)
    if args.command != "run" or getattr(args, "json", False):
        return text
    from flows.deploy import result_lines
    from flows.progress import log_file

    saved = (_LOG["path"] or log_file(cfg.paths.root, args.command)).with_suffix(".json")
    saved.write_text(text + "\n", encoding="utf-8")
    logs = str(_LOG["path"]) if _LOG["path"] is not None else "printed above (--debug)"
    return "\n".join(["", f"finsynth run: {cfg.profile or 'pipeline'} finished", *result_lines(result, saved, logs)])


def _run_flow(args: argparse.Namespace) -> dict:
    common = dict(profile=args.profile, config_path=str(args.config) if args.config else None,
                  overrides=args.overrides, root=str(args.root) if args.root else None, refresh=args.refresh)
    if args.command == "run":
        from flows.pipeline import pipeline

        return pipeline(**common, only=args.only, start=args.start, allow_stale=args.allow_stale)
    from flows.sweep import sweep

    return sweep(**common, grid=args.grid, points=args.point, name=args.name)


def _where(cfg, stage: str | None, root: Path | None) -> Path | None:
    """Where a command was writing, for an error that names no file: the stage's folder, else the root."""
    if cfg is not None and stage is not None:
        return get_stage(stage).output(cfg)
    return cfg.paths.root if cfg is not None else root


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split("\n")) if str(e) else type(e).__name__


def _summary(manifest: Manifest) -> dict:
    """What a person wants to see after a stage: counts and where things went, not file hashes."""
    return {k: v for k, v in manifest.to_json().items() if k not in ("outputs", "config")}


if __name__ == "__main__":
    sys.exit(main())
