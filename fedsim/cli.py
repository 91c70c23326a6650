"""The `fedsim` command line.

    fedsim run                                   # the offline demo: fed-sb and fedit side by side
    fedsim run configs/sst2-fedsb.yaml train.rounds=50 clients.count=200
    fedsim run --resume results/sst2 train.rounds=100
    fedsim config configs/sst2-fedsb.yaml method.rank=8

Bad input (a config value, a path, a name) raises fedsim.errors.UsageError anywhere below; it is
printed here as one line, `fedsim: error: ...`, with exit code 2. A traceback means a bug.

Subcommands live in COMMANDS: to add one (comm, report, submit, status, logs), write
`_add_NAME(parser)` and `_cmd_NAME(args) -> int` and register them as a Command.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from pathlib import Path
from typing import Callable, NamedTuple

from fedsim import __version__
from fedsim.errors import UsageError

# With no CONFIG (the embedded default), `fedsim run` compares these methods.
DEFAULT_COMPARISON = ("fed-sb", "fedit")


class Command(NamedTuple):
    help: str  # one line, shown in `fedsim --help`
    description: str  # shown in `fedsim NAME --help`
    add_arguments: Callable[[argparse.ArgumentParser], None]
    handler: Callable[[argparse.Namespace], int]


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is a UsageError (one line, exit code 2) like any other bad input."""

    def error(self, message: str):
        raise UsageError(f"{message} (see '{self.prog} --help')")


# ---------------------------------------------------------------------------------------------
# Shared: CONFIG and overrides
# ---------------------------------------------------------------------------------------------


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "items", nargs="*", metavar="CONFIG.yaml|key=value",
        help="at most one YAML config (an argument without '='), merged over the embedded default, then dotted overrides such as "
        "train.rounds=10 clients.count=200 model.target_modules=[query,value] runtime.address=null "
        "(values are read as YAML; a unique last part may stand for the whole key: rounds=10)",
    )


def _split_items(items: list[str]) -> tuple[str | None, list[str]]:
    """CONFIG is the argument without '=' (or an existing file); the others are key=value overrides."""
    config_path, overrides = None, []
    for item in items:
        if "=" in item and not os.path.isfile(item):
            overrides.append(item)
        elif config_path is None:
            config_path = item
        else:
            raise UsageError(
                f"expected key=value, got {item!r} (only one config file can be given, and it was {config_path!r})"
            )
    return config_path, overrides


def _read_config_dict(config_path: str | None, overrides: list[str]) -> dict:
    from fedsim.config import load_config_dict

    if config_path is not None and not os.path.exists(config_path) and not config_path.endswith((".yaml", ".yml")):
        raise UsageError(f"config file {config_path}: no such file (overrides are written key=value)")
    return load_config_dict(config_path, overrides)


# ---------------------------------------------------------------------------------------------
# fedsim run
# ---------------------------------------------------------------------------------------------


def _add_run(parser: argparse.ArgumentParser) -> None:
    _add_config_arguments(parser)
    parser.add_argument(
        "--resume", metavar="DIR",
        help="continue the run in DIR from its last checkpoint; the config is DIR/config.yaml plus the "
        "given overrides (e.g. train.rounds=10 to run longer)",
    )
    parser.add_argument(
        "--overwrite", action="store_true",
        help="replace the results already in output_dir instead of refusing to start",
    )
    parser.add_argument(
        "--methods", metavar="M1,M2",
        help="run the same config once per method, side by side, each in <output_dir>/<method> "
        f"(default with no CONFIG: {','.join(DEFAULT_COMPARISON)})",
    )


def _cmd_run(args: argparse.Namespace) -> int:
    from fedsim.config import config_from_dict, method_names

    config_path, overrides = _split_items(args.items)
    method_override = any(o.split("=", 1)[0].strip() == "method.name" for o in overrides)

    if args.resume is not None:
        if config_path is not None:
            raise UsageError(
                f"--resume takes its config from {os.path.join(args.resume, 'config.yaml')}; "
                f"give only key=value overrides, not {config_path!r}"
            )
        if args.methods is not None:
            raise UsageError("--resume continues one run; it cannot be combined with --methods")
        config = _resume_config(args.resume, overrides)
        from fedsim.runtime import run

        run(config, resume=args.resume, overwrite=args.overwrite)
        return 0

    data = _read_config_dict(config_path, overrides)

    if args.methods is not None:
        if method_override:
            raise UsageError("give either --methods or method.name=..., not both")
        methods = _parse_methods(args.methods, method_names())
    elif config_path is None and not method_override:
        methods = list(DEFAULT_COMPARISON)
    else:
        methods = None

    if methods is None:
        config = config_from_dict(data)
        from fedsim.runtime import run

        run(config, resume=None, overwrite=args.overwrite)
        return 0

    base_dir = data.get("output_dir")
    configs = []
    for method in methods:
        one = copy.deepcopy(data)
        one.setdefault("method", {})
        if isinstance(one["method"], dict):
            one["method"]["name"] = method
        if isinstance(base_dir, str):
            one["output_dir"] = str(Path(base_dir) / method)
        configs.append(config_from_dict(one))  # validates each, base_dir included
    from fedsim.runtime import run_comparison

    extra = {"overwrite": True} if args.overwrite else {}
    run_comparison(configs, base_dir, **extra)
    return 0


def _resume_config(run_dir: str, overrides: list[str]):
    from fedsim.config import apply_overrides, config_from_dict, read_yaml_file

    path = Path(run_dir) / "config.yaml"
    if not Path(run_dir).is_dir():
        raise UsageError(f"--resume {run_dir}: no such directory")
    if not path.is_file():
        raise UsageError(
            f"--resume {run_dir}: no config.yaml there (is it a fedsim run directory? "
            "to resume one method of a comparison, give <output_dir>/<method>)"
        )
    if any(o.split("=", 1)[0].strip() == "output_dir" for o in overrides):
        raise UsageError(f"--resume writes to {run_dir}; output_dir cannot be overridden")
    data = read_yaml_file(path)
    data["output_dir"] = str(run_dir)  # the folder may have moved since the run started
    return config_from_dict(apply_overrides(data, overrides))


def _parse_methods(text: str, valid: tuple[str, ...]) -> list[str]:
    methods = [m.strip() for m in text.split(",") if m.strip()]
    if not methods:
        raise UsageError(f"--methods: expected a comma-separated list such as fed-sb,fedit; valid: {', '.join(valid)}")
    for m in methods:
        if m not in valid:
            raise UsageError(f"--methods: unknown method '{m}'; valid: {', '.join(valid)}")
    duplicates = sorted({m for m in methods if methods.count(m) > 1})
    if duplicates:
        raise UsageError(f"--methods: '{duplicates[0]}' is listed twice")
    return methods


# ---------------------------------------------------------------------------------------------
# fedsim config
# ---------------------------------------------------------------------------------------------


def _add_config(parser: argparse.ArgumentParser) -> None:
    _add_config_arguments(parser)


def _cmd_config(args: argparse.Namespace) -> int:
    from fedsim.config import config_from_dict, config_to_yaml

    config_path, overrides = _split_items(args.items)
    config = config_from_dict(_read_config_dict(config_path, overrides))
    sys.stdout.write(config_to_yaml(config))
    return 0


# ---------------------------------------------------------------------------------------------
# The table of subcommands. Later: comm, report, submit, status, logs.
# ---------------------------------------------------------------------------------------------

COMMANDS: dict[str, Command] = {
    "run": Command(
        help="run an experiment on a local (or given) Ray cluster",
        description=(
            "Run an experiment. The config is the embedded default (the offline demo: MiniLM on BBC News),\n"
            "a YAML file merged over it, and key=value overrides over that.\n"
            "With no CONFIG, or with --methods, the same config runs once per method, side by side.\n\n"
            "examples:\n"
            "  fedsim run                                      # demo: fed-sb vs fedit\n"
            "  fedsim run my.yaml train.rounds=50 clients.count=200\n"
            "  fedsim run my.yaml --methods fed-sb,fedit,ffa-lora\n"
            "  fedsim run --resume results/my train.rounds=100"
        ),
        add_arguments=_add_run,
        handler=_cmd_run,
    ),
    "config": Command(
        help="print the resolved config as YAML (default + CONFIG + overrides), without running",
        description=(
            "Print the resolved config as YAML: the embedded default, CONFIG merged over it, then the\n"
            "key=value overrides. Validates it as `fedsim run` would.\n\n"
            "examples:\n"
            "  fedsim config                                   # the embedded default\n"
            "  fedsim config my.yaml method.rank=8 > resolved.yaml"
        ),
        add_arguments=_add_config,
        handler=_cmd_config,
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="fedsim",
        description="Simulate federated fine-tuning of language models with low-rank adapters (Fed-SB and baselines) on Ray.",
        epilog="Run 'fedsim COMMAND --help' for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"fedsim {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, command in COMMANDS.items():
        p = sub.add_parser(
            name, help=command.help, description=command.description,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        command.add_arguments(p)
    return parser


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = build_parser()
    # parse_known_args so that options may come between overrides (`run a.yaml --overwrite x=1`).
    args, extra = parser.parse_known_args(argv)
    if args.command is None:
        raise UsageError(f"missing command; choose one of: {', '.join(COMMANDS)} (see 'fedsim --help')")
    for item in extra:
        if item.startswith("-"):
            hint = f"; overrides are written without dashes: {item.lstrip('-')}" if "=" in item else ""
            raise UsageError(f"unrecognized option {item!r}{hint} (see 'fedsim {args.command} --help')")
    if extra:
        if not hasattr(args, "items"):
            raise UsageError(f"unexpected argument {extra[0]!r} (see 'fedsim {args.command} --help')")
        args.items = list(args.items) + extra
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        try:
            args = _parse(argv)
        except SystemExit as e:  # --help, --version
            return e.code if isinstance(e.code, int) else 0
        return COMMANDS[args.command].handler(args)
    except UsageError as e:
        print(f"fedsim: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fedsim: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
