"""The `fedsim` command line.

    fedsim run                                   # the offline demo: fed-sb and fedit side by side
    fedsim run configs/sst2-fedsb.yaml train.rounds=50 clients.count=200
    fedsim run --resume results/sst2 train.rounds=100
    fedsim config configs/sst2-fedsb.yaml method.rank=8
    fedsim check configs/sst2-private.yaml           # every check of `run`, without a model load or Ray

Bad input (a config value, a path, a name) raises fedsim.errors.UsageError anywhere below; it is
printed here as one line, `fedsim: error: ...`, with exit code 2. A traceback means a bug.

Subcommands live in COMMANDS: to add one, write
`_add_NAME(parser)` and `_cmd_NAME(args) -> int` and register them as a Command.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from typing import Callable, NamedTuple

from fedsim import __version__
from fedsim.errors import UsageError

# With no CONFIG (the embedded default), `fedsim run` compares these methods at equal bytes per round: MiniLM's
# query and value layers are 384×384 (d = k = 384), so FedIT at the default rank 4 sends r(d+k) = 3,072 numbers a
# layer each way and Fed-SB at rank 55 sends r² = 3,025 (both also send the 5-class head, 1,925 numbers).
# Fed-SB twice, with its LoRA-SB init from a public calibration sample: B and A downloaded at a client's first contact
# (adapters.init_at=server), and built by each client itself (init_at=client): the two train the same numbers and
# differ in their bill, bytes against the client's compute.
DEFAULT_COMPARISON = ("fed-sb:rank=55:adapters.init_data=public", "fed-sb:rank=55:adapters.init_data=public:adapters.init_at=client",
                      "fedit")


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


def _config_from(data: dict):
    """A checked config: the schema (``fedsim.config``), then ``method.name`` and the method's own settings, completed
    with their defaults (``fedsim.methods.resolved``)."""
    from fedsim.config import config_from_dict
    from fedsim.methods import resolved

    config = config_from_dict(data)
    config.method = resolved(config.method)
    return config


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
        help="run the same config once per method, side by side, each in <output_dir>/<method>; a method may carry its own "
        "settings after a colon, e.g. fed-sb:rank=55,fedit or fed-sb:rank=55:alpha=110 (a key without a dot is under "
        "method., else a full dotted key such as train.lr=0.01; they override the config and the command line for that "
        f"method only) (default with no CONFIG: {','.join(DEFAULT_COMPARISON)})",
    )
    parser.add_argument(
        "--quiet", "-q", action="store_true",
        help="for scripts: no progress bars and no closing table (errors are still printed)",
    )


def _cmd_run(args: argparse.Namespace) -> int:
    config_path, overrides = _split_items(args.items)
    method_override = any(o.split("=", 1)[0].strip() == "method.name" for o in overrides)
    progress = {"progress": False} if args.quiet else {}

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

        run(config, resume=args.resume, overwrite=args.overwrite, **progress)
        _closing(args, config.output_dir, single=True)
        return 0

    data = _read_config_dict(config_path, overrides)
    methods = _methods_to_run(args.methods, config_path, method_override)

    if methods is None:
        config = _config_from(data)
        from fedsim.runtime import run

        run(config, resume=None, overwrite=args.overwrite, **progress)
        _closing(args, config.output_dir, single=True)
        return 0

    configs = _comparison_configs(data, methods)
    from fedsim.runtime import run_comparison

    extra = {"overwrite": True} if args.overwrite else {}
    run_comparison(configs, data.get("output_dir"), **extra, **progress)
    _closing(args, data.get("output_dir"), single=False)
    return 0


def _closing(args: argparse.Namespace, output_dir: str, single: bool) -> None:
    """The answer a run ends with (unless --quiet): the table of `analysis.summary`, from the run's own files, and where things are."""
    if args.quiet:
        return
    from analysis.summary import format_summary, summary_rows, verdict
    from fedsim.storage import join

    rows = summary_rows(output_dir)
    print()
    print(format_summary(rows))
    if len(rows) > 1:
        print(verdict(rows))
    print(f"results: {output_dir}")
    print(f"plot:    {join(output_dir, 'plot.png' if single else 'comparison.png')}")
    print(f"report:  fedsim report {output_dir}    (writes {join(output_dir, 'report', 'report.md')}: "
          "figures, bytes against the analytic model)")


def _methods_to_run(methods_arg: str | None, config_path: str | None, method_override: bool) -> list[str] | None:
    """The methods of a side-by-side comparison (``--methods``, or the default's), or None for a single run.

    Each is a method name, optionally with its own settings: ``fed-sb:rank=55:alpha=110``.
    """
    from fedsim.methods import method_names

    if methods_arg is not None:
        if method_override:
            raise UsageError("give either --methods or method.name=..., not both")
        return _parse_methods(methods_arg, method_names())
    if config_path is None and not method_override:
        return list(DEFAULT_COMPARISON)
    return None


def _split_method(spec: str) -> tuple[str, list[str]]:
    """``fed-sb:rank=55:train.lr=0.01`` → ("fed-sb", ["method.rank=55", "train.lr=0.01"])."""
    name, *settings = [part.strip() for part in spec.split(":")]
    overrides = []
    for setting in settings:
        key, equals, value = setting.partition("=")
        if not equals or not key.strip() or not value.strip():
            raise UsageError(f"--methods: {spec!r}: a method's settings are key=value after a colon, e.g. fed-sb:rank=55")
        key = key.strip()
        if key in ("name", "method.name", "output_dir"):
            raise UsageError(f"--methods: {spec!r}: {key} cannot be set per method")
        overrides.append(f"{key if '.' in key else 'method.' + key}={value.strip()}")
    return name, overrides


def _method_folder(spec: str, specs: list[str]) -> str:
    """A comparison member's folder: the method's name, or with the settings that tell it from the other members of that
    name where the name occurs twice (fed-sb-rank55; fed-sb and fed-sb-init_atclient)."""
    name, overrides = _split_method(spec)
    namesakes = [_split_method(s)[1] for s in specs if _split_method(s)[0] == name]
    if len(namesakes) == 1:
        return name
    parts = [name] + [o.split("=", 1)[0].rsplit(".", 1)[-1] + "".join(c for c in o.split("=", 1)[1] if c.isalnum() or c in ".-")
                      for o in overrides if not all(o in other for other in namesakes)]
    return "-".join(parts)


def _comparison_configs(data: dict, specs: list[str]) -> list:
    """One validated config per member of a comparison, each in ``<output_dir>/<folder>`` with its own settings."""
    from fedsim.config import apply_overrides
    from fedsim.storage import join

    base_dir = data.get("output_dir")
    configs = []
    for spec in specs:
        name, overrides = _split_method(spec)
        one = copy.deepcopy(data)
        if isinstance(one.setdefault("method", {}), dict):
            one["method"]["name"] = name
        one = apply_overrides(one, overrides)
        if isinstance(base_dir, str):
            one["output_dir"] = join(base_dir, _method_folder(spec, specs))
        configs.append(_config_from(one))  # validates each, base_dir included
    return configs


def _resume_config(run_dir: str, overrides: list[str]):
    from fedsim.config import apply_overrides, read_yaml_file
    from fedsim.storage import Location

    path = Location(run_dir) / "config.yaml"
    if not Location(run_dir).is_dir():
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
    return _config_from(apply_overrides(data, overrides))


def _parse_methods(text: str, valid: tuple[str, ...]) -> list[str]:
    specs = [m.strip() for m in text.split(",") if m.strip()]
    if not specs:
        raise UsageError(f"--methods: expected a comma-separated list such as fed-sb,fedit; valid: {', '.join(valid)}")
    for spec in specs:
        name, _ = _split_method(spec)
        if name not in valid:
            raise UsageError(f"--methods: unknown method '{name}'; valid: {', '.join(valid)}")
    folders = [_method_folder(spec, specs) for spec in specs]
    duplicates = sorted({spec for spec, folder in zip(specs, folders) if folders.count(folder) > 1})
    if duplicates:
        raise UsageError(f"--methods: '{duplicates[0]}' is listed twice")
    return specs


# ---------------------------------------------------------------------------------------------
# fedsim check
# ---------------------------------------------------------------------------------------------


def _add_check(parser: argparse.ArgumentParser) -> None:
    _add_config_arguments(parser)
    parser.add_argument("--resume", metavar="DIR",
                        help="check resuming the run in DIR with the given overrides (e.g. train.rounds=10): the DP recalibration")
    parser.add_argument("--methods", metavar="M1,M2", help="check the config once per method, as fedsim run --methods would run it "
                        f"(default with no CONFIG: {','.join(DEFAULT_COMPARISON)})")


def _cmd_check(args: argparse.Namespace) -> int:
    from fedsim.runtime.driver import check

    config_path, overrides = _split_items(args.items)
    if args.resume is not None:
        if config_path is not None or args.methods is not None:
            raise UsageError(f"--resume takes its config from {os.path.join(args.resume, 'config.yaml')}; give only key=value overrides")
        configs = [_resume_config(args.resume, overrides)]
    else:
        data = _read_config_dict(config_path, overrides)
        method_override = any(o.split("=", 1)[0].strip() == "method.name" for o in overrides)
        methods = _methods_to_run(args.methods, config_path, method_override)
        configs = [_config_from(data)] if methods is None else _comparison_configs(data, methods)
    what = config_path or (f"--resume {args.resume}" if args.resume else "the embedded default")
    for config in configs:
        result = check(config, resume=args.resume)
        print(f"fedsim check: {what} ({config.method.name}): ok: {', '.join(result.checked)}")
        if result.unchecked:
            print("fedsim check: not checked on this machine: " + "; ".join(f"{area} ({why})" for area, why in result.unchecked.items()))
        for note in result.notes:
            print(f"fedsim check: note: {note}")
    return 0


# ---------------------------------------------------------------------------------------------
# fedsim config
# ---------------------------------------------------------------------------------------------


def _add_config(parser: argparse.ArgumentParser) -> None:
    _add_config_arguments(parser)
    parser.add_argument("--list", action="store_true", help="list every setting: key, type, default, valid values, help")


def _cmd_config(args: argparse.Namespace) -> int:
    from fedsim.config import config_to_yaml
    from fedsim.methods import option_settings

    if args.list:
        rows = _settings_rows()
        widths = {k: max(len(k), *(len(r[k]) for r in rows)) for k in ("key", "type", "default", "valid")}
        for row in [{"key": "key", "type": "type", "default": "default", "valid": "valid", "help": "help"}, *rows]:
            print("  ".join(row[k].ljust(w) for k, w in widths.items()) + "  " + row["help"])
        return 0
    config_path, overrides = _split_items(args.items)
    config = _config_from(_read_config_dict(config_path, overrides))
    sys.stdout.write(config_to_yaml(config, rest_help={row["key"].split(".", 1)[1]: row["help"] for row in option_settings()}))
    return 0


def _settings_rows() -> list[dict[str, str]]:
    """Every setting (``fedsim config --list``): the config's (``fedsim.config``), the methods' own after the method
    section's, and the registered methods as method.name's valid values."""
    from fedsim.config import describe_settings
    from fedsim.methods import method_names, option_settings

    rows = describe_settings()
    for row in rows:
        if row["key"] == "method.name":
            row["valid"] = " | ".join(method_names())
    end = max(i for i, row in enumerate(rows) if row["key"].startswith("method.")) + 1
    return rows[:end] + option_settings() + rows[end:]


# ---------------------------------------------------------------------------------------------
# fedsim methods
# ---------------------------------------------------------------------------------------------


def _cmd_methods(args: argparse.Namespace) -> int:
    from fedsim.methods import methods_table, options_table

    print(methods_table())
    print()
    print("Each method's own settings (`method.<key>`, beside the shared ones; a setting of another method is ignored):")
    print()
    print(options_table())
    return 0


# ---------------------------------------------------------------------------------------------
# fedsim comm (analysis/comm.py)
# ---------------------------------------------------------------------------------------------


def _add_comm(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="minilm", metavar="M",
                        help="a preset (bert-base, roberta-base, roberta-large, minilm-l6, llama-3.2-3b, mistral-7b, "
                        "gemma-2-9b), an HF config.json, or a model folder (default: minilm)")
    parser.add_argument("--method", default="all", metavar="METHOD|all", help="a method, a comma-separated list, or all (default)")
    parser.add_argument("--rank", default="4", metavar="R[,R…]", help="adapter rank(s) (default 4)")
    parser.add_argument("--clients", default="10", metavar="C[,C…]", help="clients taking part each round (default 10)")
    parser.add_argument("--targets", metavar="T1,T2",
                        help="target modules (default: query,value for BERT-like models, the seven projections for Llama-like ones)")
    parser.add_argument("--rounds", type=int, default=1, help="rounds for the total column (default 1)")
    parser.add_argument("--dtype", default="float32", help="adapter dtype: float32 (default), bfloat16, float16")
    parser.add_argument("--head", action="store_true", help="count the classification head (method.train_head) both ways")
    parser.add_argument("--labels", type=int, metavar="N", help="classes of the head (default: the config's, else 2)")
    parser.add_argument("--task", default="classification", help="classification (default) or causal-lm (names of the layers)")
    parser.add_argument("--json", action="store_true", help="print JSON rows instead of the table")
    parser.add_argument("--init-at", choices=("server", "client"), help="who builds the round-0 adapters (adapters.init_at): "
                        "server (a first contact downloads them) or client (each client builds them); default: both, for "
                        "methods that keep tensors no round changes (Fed-SB's B and A)")
    parser.add_argument("--control-variates", action="store_true", help="SCAFFOLD (train.control_variates): each client's Δc up and "
                        "the server's c down, besides the method's messages")
    parser.add_argument("settings", nargs="*", metavar="method.KEY=VALUE",
                        help="method settings, as in a config: method.switch_round=2 method.adapter=lora "
                        "method.fedex_downlink=stacked (fedex-lora shows its residual and stacked downlinks unless set)")


def _cmd_comm(args: argparse.Namespace) -> int:
    import json

    from analysis.comm import comm_table, format_table, parse_ints

    targets = [t.strip() for t in args.targets.split(",") if t.strip()] if args.targets else None
    if args.labels is not None and args.labels < 1:
        raise UsageError(f"--labels: must be ≥ 1, got {args.labels}")
    rows = comm_table(
        args.model, args.method, parse_ints(args.rank, "--rank"), parse_ints(args.clients, "--clients"),
        target_modules=targets, rounds=args.rounds, task=args.task, head=args.head, num_labels=args.labels,
        dtype=args.dtype, init_at=args.init_at, control_variates=args.control_variates, **_method_settings(args.settings),
    )
    if args.json:
        print(json.dumps([row.as_dict() for row in rows], indent=1))
    else:
        print(format_table(rows))
    return 0


def _method_settings(items: list[str]) -> dict:
    """``method.KEY=VALUE`` items as MethodConfig keyword arguments, checked as a config's method section is."""
    from fedsim.config import parse_override

    settings = {}
    for item in items:
        key, value = parse_override(item)
        section, _, name = key.rpartition(".")
        if section != "method" or name in ("name", "rank"):
            raise UsageError(f"{key}: fedsim comm takes method.* settings here (method.name and method.rank are "
                             "--method and --rank); e.g. method.switch_round=2")
        settings[name] = value
    from fedsim.config import config_from_dict
    from fedsim.methods import check_settings

    check_settings(config_from_dict({"method": settings}).method)  # an unknown key or a bad value: one line naming it
    return settings


# ---------------------------------------------------------------------------------------------
# fedsim report (analysis/report.py)
# ---------------------------------------------------------------------------------------------


def _add_report(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dirs", nargs="+", metavar="DIR", help="run folders, or folders of runs (a comparison, a sweep)")
    parser.add_argument("--out", metavar="OUT", help="where to write the PNGs and report.md (default: <first DIR>/report)")
    parser.add_argument("--clients", default="10,20,50,100,200,500,1000", metavar="C,C…",
                        help="client counts of the analytic communication plot (default 10 to 1000)")


def _cmd_report(args: argparse.Namespace) -> int:
    from analysis.comm import parse_ints
    from analysis.report import write_report
    from fedsim.storage import Location

    for d in args.dirs:
        if not Location(d).exists() and not Location(d).is_dir():
            raise UsageError(f"report: {d}: no such folder; pass the output_dir of a fedsim run")
    from analysis.summary import format_summary, summary_rows

    report = write_report(args.dirs, args.out, clients=parse_ints(args.clients, "--clients"))
    print(format_summary(summary_rows(args.dirs)))
    print(report)
    return 0


# ---------------------------------------------------------------------------------------------
# fedsim sweep (analysis/sweep.py)
# ---------------------------------------------------------------------------------------------


def _add_sweep(parser: argparse.ArgumentParser) -> None:
    _add_config_arguments(parser)
    parser.add_argument("--grid", nargs="+", required=True, metavar="KEY=V1,V2",
                        help="the grid: one or more dotted keys, each with comma-separated values "
                        "(e.g. method.name=fed-sb,fedit clients.count=10,100 method.rank=4,16); give fixed overrides before --grid")
    parser.add_argument("--overwrite", action="store_true", help="run every point again, also those already finished")
    parser.add_argument("--dry-run", action="store_true", help="list the points and where they go, run nothing")


def _cmd_sweep(args: argparse.Namespace) -> int:
    from analysis.sweep import parse_grid, run_sweep

    config_path, overrides = _split_items(args.items)
    grid = parse_grid(args.grid)
    path = run_sweep(config_path, grid, overrides, overwrite=args.overwrite, dry_run=args.dry_run)
    if not args.dry_run:
        print(path)
    return 0


# ---------------------------------------------------------------------------------------------
# fedsim tune (analysis/tune.py: Ray Tune)
# ---------------------------------------------------------------------------------------------


def _add_tune(parser: argparse.ArgumentParser) -> None:
    _add_config_arguments(parser)
    parser.add_argument("--space", nargs="+", required=True, metavar="KEY=SPEC",
                        help="the search: dotted keys, each with values to cross (method.name=fed-sb,fedit) or a distribution "
                        "drawn once a trial: loguniform(low,high), uniform(low,high), choice(a,b,…); give overrides before --space")
    parser.add_argument("--samples", type=int, default=1, metavar="N",
                        help="draws of the distributions, each crossed with the listed values (default 1)")
    parser.add_argument("--seeds", metavar="S,S…", help="run each trial at these seeds and score the mean (e.g. 0,1,2)")
    parser.add_argument("--asha", action="store_true", help="stop poor trials early (ASHA, at rounds grace, 2·grace, 4·grace…)")
    parser.add_argument("--grace-rounds", type=int, default=1, metavar="R", help="ASHA's first rung, in rounds (default 1)")
    parser.add_argument("--metric", default="eval_metric", metavar="COLUMN",
                        help="what scores a trial: eval_metric (accuracy or exact match, higher is better; the default) or eval_loss")
    parser.add_argument("--best-per", metavar="KEY", help="write the best config for each value of KEY (e.g. method.name)")
    parser.add_argument("--concurrent", type=int, metavar="N", help="trials at once (default: as many as the cluster has room for)")
    parser.add_argument("--overwrite", action="store_true", help="start the search again (default: resume the one output_dir holds)")
    parser.add_argument("--dry-run", action="store_true", help="check the search and say how many trials it runs; run nothing")


def _cmd_tune(args: argparse.Namespace) -> int:
    from analysis.comm import parse_ints
    from analysis.tune import parse_space, run_tune

    config_path, overrides = _split_items(args.items)
    seeds = parse_ints(args.seeds, "--seeds", minimum=0) if args.seeds else None
    if args.grace_rounds < 1 or (args.concurrent is not None and args.concurrent < 1):
        raise UsageError(f"--{'grace-rounds' if args.grace_rounds < 1 else 'concurrent'}: give a count ≥ 1")
    path = run_tune(config_path, parse_space(args.space), overrides, samples=args.samples, seeds=seeds, asha=args.asha,
                    grace_rounds=args.grace_rounds, metric=args.metric, best_per=args.best_per, concurrent=args.concurrent,
                    overwrite=args.overwrite, dry_run=args.dry_run)
    if not args.dry_run:
        print(path / "tune.parquet")
    return 0


# ---------------------------------------------------------------------------------------------
# fedsim submit / status / logs (fedsim/jobs.py: the Ray Jobs API)
# ---------------------------------------------------------------------------------------------


def _add_address(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", metavar="URL",
                        help="the Ray dashboard of the cluster, e.g. http://HEAD:8265 (default: $RAY_API_SERVER_ADDRESS or $RAY_ADDRESS)")


def _add_submit(parser: argparse.ArgumentParser) -> None:
    _add_config_arguments(parser)
    _add_address(parser)
    parser.add_argument("--wait", action="store_true",
                        help="stream the job's logs until it ends, and exit with its exit status")
    parser.add_argument("--methods", metavar="M1,M2", help="run the config once per method, side by side (as fedsim run --methods)")
    parser.add_argument("--overwrite", action="store_true", help="let the job replace the results already in output_dir")
    parser.add_argument("--pip", default="project", metavar="project|none|FILE",
                        help="the job's pip requirements: fedsim's own and what they need, at the versions of the project's "
                        "lock, constraints.txt (project, default; ray and torch stay the cluster's), none (the cluster's image "
                        "has them), or a requirements file")
    parser.add_argument("--job-id", metavar="ID", help="the job's submission id (default: Ray's)")
    parser.add_argument("--entrypoint-cpus", type=float, metavar="N",
                        help="CPUs reserved for the driver process (default: none, so the driver can run on the head node of a "
                        "cluster whose CPUs all go to worker actors)")


def _cmd_submit(args: argparse.Namespace) -> int:
    from fedsim import jobs

    config_path, overrides = _split_items(args.items)
    method_override = any(o.split("=", 1)[0].strip() == "method.name" for o in overrides)
    data = _read_config_dict(config_path, overrides)
    methods = _methods_to_run(args.methods, config_path, method_override)
    config = _config_from(data)
    if methods:  # as fedsim run would: every method's config is valid
        _comparison_configs(data, methods)
    client, job_id = jobs.submit(config, args.address, methods=methods, pip=args.pip, overwrite=args.overwrite,
                                 submission_id=args.job_id, entrypoint_num_cpus=args.entrypoint_cpus)
    print(job_id, flush=True)
    print(f"fedsim: submitted job {job_id}; results in {config.output_dir}", file=sys.stderr)
    if not args.wait:
        print(f"fedsim: follow it with `fedsim logs {job_id} --follow`, check it with `fedsim status {job_id}`", file=sys.stderr)
        return 0
    return _follow(client, job_id)


def _follow(client, job_id: str) -> int:
    from fedsim import jobs

    try:
        code = jobs.follow(client, job_id)
    except KeyboardInterrupt:
        print(f"fedsim: stopped following job {job_id}; it keeps running (stop it with `ray job stop {job_id}`)", file=sys.stderr)
        return 130
    status = jobs.status_name(jobs.job_info(client, job_id))
    print(f"fedsim: job {job_id} {status} (exit status {code})", file=sys.stderr)
    return code


def _add_job(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("job_id", metavar="JOB", help="the job id that fedsim submit printed")
    _add_address(parser)


def _add_logs(parser: argparse.ArgumentParser) -> None:
    _add_job(parser)
    parser.add_argument("--follow", "-f", action="store_true", help="keep streaming until the job ends, then exit with its status")


def _cmd_status(args: argparse.Namespace) -> int:
    from fedsim import jobs

    client = jobs.job_client(args.address)
    print(jobs.describe(jobs.job_info(client, args.job_id)))
    return 0


def _cmd_logs(args: argparse.Namespace) -> int:
    from fedsim import jobs

    client = jobs.job_client(args.address)
    if args.follow:
        return _follow(client, args.job_id)
    jobs.job_info(client, args.job_id)  # an unknown job is a one-line error
    sys.stdout.write(client.get_job_logs(args.job_id))
    return 0


# ---------------------------------------------------------------------------------------------
# The table of subcommands.
# ---------------------------------------------------------------------------------------------

COMMANDS: dict[str, Command] = {
    "run": Command(
        help="run an experiment on a local (or given) Ray cluster",
        description=(
            "Run an experiment. The config is the embedded default (the offline demo: MiniLM on BBC News),\n"
            "a YAML file merged over it, and key=value overrides over that.\n"
            "With no CONFIG, or with --methods, the same config runs once per method, side by side; a method\n"
            "may carry its own settings after a colon (fed-sb:rank=55). It ends with a table per method (final\n"
            "accuracy, bytes per client per round and in all, max aggregation error, wall time, epsilon where\n"
            "private) and the paths of the results and the plot; --quiet prints neither.\n\n"
            "The demo (no CONFIG) compares fed-sb at rank 55 with fedit at rank 4: equal bytes per round\n"
            "(r^2 = 3,025 against r(d+k) = 3,072 numbers per adapted layer of MiniLM).\n\n"
            "examples:\n"
            "  fedsim run                                      # demo: fed-sb r=55 vs fedit r=4\n"
            "  fedsim run my.yaml train.rounds=50 clients.count=200\n"
            "  fedsim run my.yaml --methods fed-sb,fedit,ffa-lora\n"
            "  fedsim run my.yaml --methods fed-sb:rank=64,fedit:rank=8:train.lr=0.001\n"
            "  fedsim run --resume results/my train.rounds=100"
        ),
        add_arguments=_add_run,
        handler=_cmd_run,
    ),
    "check": Command(
        help="run every check `fedsim run` makes before training, without loading weights or starting Ray",
        description=(
            "Check a config as `fedsim run` would before training: the config, the method, the private-init guard,\n"
            "the workload and its partition, the model and its target modules (no weights loaded), the DP\n"
            "calibration (with --resume: the recalibration for the rounds still to run). Nothing is written and\n"
            "Ray is not started. A model or data files not on this machine are skipped, and named in one line.\n"
            "Exit code 0 when it passes, 2 (with one line saying what is wrong) when `fedsim run` would refuse it.\n\n"
            "examples:\n"
            "  fedsim check configs/sst2-private.yaml privacy.epsilon=1\n"
            "  fedsim check --resume results/sst2-private train.rounds=10"
        ),
        add_arguments=_add_check,
        handler=_cmd_check,
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
    "methods": Command(
        help="the registered methods as a Markdown table (what a client trains, the aggregate, exactness, paper), and their own settings",
        description="Print every registered method (fedsim.methods), and each one's own settings (method.<key>), as the\n"
        "Markdown tables README.md shows.",
        add_arguments=lambda parser: None,
        handler=_cmd_methods,
    ),
    "comm": Command(
        help="communication cost per client and round of every method, from a model's shapes (analytic)",
        description=(
            "Print the parameters and bytes each method sends per client per round, up and down, and the\n"
            "totals, from a model's architecture (a preset, an HF config.json or a model folder; no weights).\n\n"
            "examples:\n"
            "  fedsim comm --model llama-3.2-3b --method all --rank 32,120 --clients 10,100,1000\n"
            "  fedsim comm --model bert-base --targets query,value --method fed-sb,fedit --rank 16 --json\n"
            "  fedsim comm --model mistral-7b --method fedex-lora --rank 32 --clients 25   # residual and stacked downlinks"
        ),
        add_arguments=_add_comm,
        handler=_cmd_comm,
    ),
    "report": Command(
        help="write the figures and a Markdown summary of one or more runs",
        description=(
            "Write PNGs (accuracy vs communicated parameters with the Pareto front, analytic communication vs\n"
            "clients, metric and loss per round, aggregation error, epsilon vs accuracy where private) and\n"
            "report.md, with the measured bytes beside the analytic prediction (mismatches flagged); print\n"
            "the runs' closing table (as fedsim run ends with) and the report's path.\n\n"
            "examples:\n"
            "  fedsim report results/default\n"
            "  fedsim report results/a results/b --out results/ab-report"
        ),
        add_arguments=_add_report,
        handler=_cmd_report,
    ),
    "submit": Command(
        help="submit a run to a Ray cluster as a job (Ray Jobs API); print its id",
        description=(
            "Resolve and check the config here, then submit it to a Ray cluster as a job: the project's code\n"
            "is the job's working_dir and its requirements the job's pip list; on the cluster the job runs\n"
            "`fedsim run` on the resolved config. output_dir must be shared storage: an absolute path every\n"
            "node mounts, or a URI (s3://bucket/run, gs://…). Prints the job id on stdout.\n\n"
            "examples:\n"
            "  fedsim submit my.yaml output_dir=s3://bucket/runs/a --address http://HEAD:8265 --wait\n"
            "  JOB=$(fedsim submit my.yaml output_dir=/shared/runs/b --pip none)"
        ),
        add_arguments=_add_submit,
        handler=_cmd_submit,
    ),
    "status": Command(
        help="the status of a submitted job",
        description="Print a submitted job's status, entrypoint, times, exit code and fedsim metadata.\n\n"
                    "example:\n  fedsim status raysubmit_abc123 --address http://HEAD:8265",
        add_arguments=_add_job,
        handler=_cmd_status,
    ),
    "logs": Command(
        help="the logs of a submitted job",
        description="Print a submitted job's logs so far; with --follow, stream them until it ends and exit with its status.\n\n"
                    "example:\n  fedsim logs raysubmit_abc123 --address http://HEAD:8265 --follow",
        add_arguments=_add_logs,
        handler=_cmd_logs,
    ),
    "sweep": Command(
        help="run a grid of configs under one Ray session and gather the rounds in one Parquet table",
        description=(
            "Run every point of a grid (the config with each combination of the --grid values) into\n"
            "<output_dir>/<point>/, then gather every point's rounds into <output_dir>/sweep.parquet.\n"
            "Finished points are skipped unless --overwrite. runtime.address=auto runs on a cluster.\n\n"
            "examples:\n"
            "  fedsim sweep my.yaml train.rounds=10 --grid method.name=fed-sb,fedit clients.count=10,100\n"
            "  fedsim sweep my.yaml --grid method.rank=4,16,64 --dry-run"
        ),
        add_arguments=_add_sweep,
        handler=_cmd_sweep,
    ),
    "tune": Command(
        help="search config keys (each method's lr, …) on Ray Tune, scored on a validation split; write the best config",
        description=(
            "Run trials of the config with values from --space (listed values crossed; distributions drawn\n"
            "--samples times) into <output_dir>/<trial>/, each scored by eval_metric on the rows\n"
            "workload.validation carves out of the training data (required: never the evaluation file).\n"
            "Trials run at once where the Ray cluster has room; --asha stops poor ones early. Writes\n"
            "<output_dir>/tune.parquet (every trial's rounds, fedsim sweep's layout) and best.yaml (or\n"
            "best-<value>.yaml per value of --best-per). The same command again resumes a stopped tune.\n\n"
            "examples:\n"
            "  fedsim tune my.yaml workload.validation=2000 --space \"train.lr=loguniform(1e-4,1e-1)\" --samples 8 --asha\n"
            "  fedsim tune my.yaml workload.validation=2000 --space method.name=fed-sb,fedit train.lr=0.001,0.003,0.01 \\\n"
            "      --best-per method.name --seeds 0,1"
        ),
        add_arguments=_add_tune,
        handler=_cmd_tune,
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
    except KeyboardInterrupt as e:
        print(str(e) or "fedsim: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
