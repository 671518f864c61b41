"""What every job entry point shares: flags from its config dataclass, path checks, Ray.

Flags (:func:`parse`): a job's config is one dataclass; each field is a flag named after
it (``keep_numbers`` -> ``--keep-numbers``) with the string literal under the field as its
help, made by tyro: defaults shown in ``--help``, ``Literal`` fields as choices, booleans
as ``--flag/--no-flag``, lists as several values (``--k 5 10``) or, marked with
``tyro.conf.UseAppendAction``, a repeatable flag. Aliases are declared on the field
(``Annotated[str, tyro.conf.arg(aliases=("--out",))]``); one field given twice with
different values (``--k 3 --num-labels 5``, ``--k 5 --k 10``, ``--flag --no-flag``) is a
usage error, where argparse would keep the last in silence; so is nan or infinity for a
number flag (it would slip past every range check). A job with presets has a
``config`` field: ``--config preset.yaml`` makes the preset's values the defaults, and
flags override them. ``__post_init__`` checks values; its ``ValueError`` becomes a usage
error (exit status 2).

Paths (:func:`resolve_paths`): local paths become absolute; URLs (``s3://``...) stay as
they are; under ``ray job submit`` a relative path is refused, since the job runs in a
copy of the working dir on the cluster.

Ray (:func:`ray_session`): join the cluster named by ``--address`` or ``RAY_ADDRESS``
(which ``ray job submit`` sets), else start a private local instance on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import logging
import math
import os
import socket
import sys
import types
import typing
from collections.abc import Iterator, Sequence
from typing import Any, TypeVar

from pipeline import ast_guard
from pipeline.storage import is_url

T = TypeVar("T")
SUBMITTED = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set in the driver of a job started by `ray job submit`
_BOOL_WORDS = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}


# ----------------------------------------------------------------------------- flags


def parse(cls: type[T], argv: Sequence[str] | None, *, prog: str, description: str | None) -> T:
    """The config of a job from its command line (``argv``; None: ``sys.argv[1:]``); see the module docstring."""
    import tyro

    ast_guard.install()  # a job's threads may format tracebacks at once (pipeline/ast_guard.py)

    args = list(sys.argv[1:] if argv is None else argv)
    hints = typing.get_type_hints(cls)
    bools = {f.name for f in dataclasses.fields(cls) if hints[f.name] is bool}
    args = _old_bool_spellings(args, bools)
    _refuse_conflicting_values(cls, args, prog)
    default = _preset(cls, args) if "config" in {f.name for f in dataclasses.fields(cls)} else None
    return tyro.cli(cls, args=args, default=default, prog=prog, description=description)


def _flag_spellings(cls: type) -> tuple[dict[str, tuple[str, tuple[str, ...] | None]], dict[str, Any], set[str]]:
    """(each spelling of each flag -> (its field, the value the spelling itself gives, for
    ``--flag`` / ``--no-flag`` booleans), each field's type without ``Annotated``, the
    repeatable fields (``tyro.conf.UseAppendAction``))."""
    import tyro

    names: dict[str, tuple[str, tuple[str, ...] | None]] = {}
    hints = typing.get_type_hints(cls, include_extras=True)
    types, repeatable = {}, set()
    for field in dataclasses.fields(cls):
        metas = getattr(hints[field.name], "__metadata__", ())
        if any(meta is tyro.conf.UseAppendAction for meta in metas):
            repeatable.add(field.name)
        flag, aliases = field.name, ()
        for meta in metas:
            flag = getattr(meta, "name", None) or flag
            aliases = getattr(meta, "aliases", None) or aliases
        types[field.name] = bare = typing.get_args(hints[field.name])[0] if metas else hints[field.name]
        for spelling in ("--" + flag.removeprefix("--"), *aliases):
            body = spelling.removeprefix("--")
            for variant in (body, body.replace("_", "-"), body.replace("-", "_")):  # tyro takes both
                names["--" + variant] = (field.name, ("true",) if bare is bool else None)
                if bare is bool:
                    names["--no-" + variant] = names["--no_" + variant] = (field.name, ("false",))
    return names, types, repeatable


def _refuse_conflicting_values(cls: type, args: list[str], prog: str) -> None:
    """Exit 2 when one field is given twice with different values: under two of its names
    (flag and alias), as ``--flag`` and ``--no-flag``, or one name repeated (argparse would keep
    the last in silence); or when a number flag is given nan or infinity, which slips past
    every range check. Repeatable fields (``tyro.conf.UseAppendAction``) repeat by design."""
    names, types, repeatable = _flag_spellings(cls)
    given: dict[str, list[tuple[str, tuple[str, ...]]]] = {}  # field -> (spelling, values) as given, in order
    for i, arg in enumerate(args):
        flag, eq, value = arg.partition("=")
        if flag in names:
            field, fixed = names[flag]
            values = fixed or ((value,) if eq else tuple(itertools.takewhile(lambda a: not a.startswith("--"), args[i + 1 :])))
            given.setdefault(field, []).append((flag, values))
    problem = None
    for field, said in given.items():
        numbers = [float(v) for _, values in said for v in values if _is_float(v)] if float in (types[field], *typing.get_args(types[field])) else []
        last = dict(said)  # the last value under each spelling
        if any(not math.isfinite(x) for x in numbers):
            problem = f"{said[0][0]} {' '.join(said[0][1])}: this flag takes a finite number"
        elif field in repeatable or len({values for _, values in said}) < 2:
            continue
        elif types[field] is bool:
            problem = f"{' and '.join(last)}: these contradict each other; give one"
        elif len(last) > 1:
            problem = " and ".join(f"{flag} {' '.join(values)}".strip() for flag, values in last.items())
            problem += ": these are one flag under two names; give one value"
        else:
            flag = said[0][0]
            problem = " and ".join(f"{flag} {' '.join(values)}".strip() for _, values in said)
            problem += ": the flag is given twice with different values; give it once"
            if typing.get_origin(types[field]) in (list, tuple):
                problem += f" (a list takes several values after one {flag})"
        break
    if problem:
        print(f"usage: {prog} [-h] [OPTIONS]\nerror: {problem}", file=sys.stderr)
        raise SystemExit(2)


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _old_bool_spellings(args: list[str], bools: set[str]) -> list[str]:
    """``--flag true`` / ``--flag=no`` (the spellings jobs took before) as ``--flag`` / ``--no-flag``."""
    flags = {f"--{name.replace('_', '-')}": name for name in bools}
    out, i = [], 0
    while i < len(args):
        arg = args[i]
        flag, eq, value = arg.partition("=")
        if flag in flags and eq and value.lower() in _BOOL_WORDS:
            out.append(flag if _BOOL_WORDS[value.lower()] else "--no-" + flag[2:])
        elif arg in flags and i + 1 < len(args) and args[i + 1].lower() in _BOOL_WORDS:
            out.append(arg if _BOOL_WORDS[args[i + 1].lower()] else "--no-" + arg[2:])
            i += 1
        else:
            out.append(arg)
        i += 1
    return out


def _preset(cls: type[T], args: list[str]) -> T | None:
    """The defaults a ``--config`` YAML preset gives (None without one); fields it does not set keep theirs.

    A list field given on the command line replaces the preset's list instead of adding to it.
    """
    import argparse

    import tyro
    import yaml

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(args)
    if not known.config:
        return None
    try:
        with open(known.config) as f:
            values = yaml.safe_load(f) or {}
    except OSError as err:
        _usage_error(f"--config {known.config}: {err.strerror}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if not isinstance(values, dict) or set(values) - set(fields):
        unknown = sorted(set(values) - set(fields)) if isinstance(values, dict) else "not a mapping"
        _usage_error(f"--config {known.config}: unknown field(s) {unknown}")
    values["config"] = known.config
    given = {a.split("=")[0] for a in args if a.startswith("--")}
    default = cls.__new__(cls)  # unchecked: __post_init__ runs on the final values only
    for name, f in fields.items():
        flag = f"--{name.replace('_', '-')}"
        if name in values and not (isinstance(values[name], list) and flag in given):
            value = _from_yaml(cls, name, values[name], f"--config {known.config}")
        elif f.default is not dataclasses.MISSING:
            value = f.default
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
        else:
            value = tyro.MISSING
        object.__setattr__(default, name, value)
    return default


def _from_yaml(cls: type, name: str, value: Any, where: str) -> Any:
    """A YAML value as the field's type: mappings in a list of dataclasses become those (their keys
    checked), numbers YAML 1.1 reads as text (``3e-5``) become floats; a value of another kind is
    a usage error naming ``where`` (the preset) and the field."""
    hint = typing.get_type_hints(cls)[name]
    args = typing.get_args(hint)
    if isinstance(value, list) and args and dataclasses.is_dataclass(args[0]):
        return [_yaml_entry(args[0], v, f"{where}: {name}[{i}]") for i, v in enumerate(value)]
    kinds = set(args) - {type(None)} if typing.get_origin(hint) in (typing.Union, types.UnionType) else {hint}
    if value is None or len(kinds) != 1:
        return value
    kind = kinds.pop()
    if kind is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
        try:
            number = float(value)
        except ValueError:
            _usage_error(f"{where}: {name}: {value!r} is not a number")
        if not math.isfinite(number):
            _usage_error(f"{where}: {name}: {value!r}: this field takes a finite number")
        return number
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        _usage_error(f"{where}: {name}: {value!r} is not a whole number")
    if kind is bool and not isinstance(value, bool):
        _usage_error(f"{where}: {name}: {value!r} is not true or false")
    return value


def _yaml_entry(cls: type, value: Any, where: str) -> Any:
    """One mapping of a YAML list as the dataclass ``cls``; its keys must be the dataclass's fields."""
    if not isinstance(value, dict):
        return value
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(value) - set(names))
    if unknown:
        _usage_error(f"{where}: unknown key(s) {unknown} (an entry takes {', '.join(names)})")
    try:
        return cls(**value)
    except (TypeError, ValueError) as err:
        _usage_error(f"{where}: {err}")


def _usage_error(message: str) -> typing.NoReturn:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


# ----------------------------------------------------------------------------- paths


def resolve_paths(cfg: Any, names: Sequence[str]) -> None:
    """Make the local paths among ``cfg``'s fields ``names`` absolute (in place); URLs stay as they are.

    Raises ``ValueError`` for a relative path under ``ray job submit``: there the job runs
    in a copy of the working dir on the cluster, where a relative path means nothing useful.
    """
    submitted = SUBMITTED in os.environ
    for name in names:
        value = getattr(cfg, name)
        paths = value if isinstance(value, list) else [value]
        resolved = []
        for path in paths:
            if path is None or is_url(path):
                resolved.append(path)
                continue
            path = path.removeprefix("file://")
            if submitted and not os.path.isabs(path):
                raise ValueError(
                    f"--{name.replace('_', '-')} {path} is relative: under `ray job submit` the job runs in a copy of "
                    "the working dir on the cluster, so pass an absolute path (paths are resolved on the cluster)"
                )
            resolved.append(os.path.abspath(path))
        setattr(cfg, name, resolved if isinstance(value, list) else resolved[0])


def print_path_error(err: Exception) -> None:
    """A missing or refused path, said with where it was looked for (the cluster, under `ray job submit`)."""
    where = "the cluster" if SUBMITTED in os.environ else "this machine"
    print(
        f"error: {err} (looked on {socket.gethostname()}, {where}: paths are resolved where the job runs, "
        "which under `ray job submit` is the cluster, so they must exist there)",
        file=sys.stderr,
    )


# ----------------------------------------------------------------------------- Ray


def _submitted_runtime_env() -> dict:
    """The runtime env the submitter gave the job (``ray job submit --runtime-env-json``)."""
    try:
        return json.loads(os.environ.get(SUBMITTED, "{}")).get("runtime_env") or {}
    except (ValueError, AttributeError):
        return {}


def job_runtime_env(env_vars: dict[str, str] | None = None) -> dict | None:
    """What :func:`ray_session` adds to the job's runtime env (None: nothing): ``env_vars`` the
    submitter did not set, and the ``ast.parse`` guard as the workers' setup hook where needed."""
    submitted = _submitted_runtime_env()
    taken = submitted.get("env_vars") or {}
    runtime_env: dict = {"env_vars": {k: v for k, v in env_vars.items() if k not in taken}} if env_vars else {}
    if ast_guard.affected() and "worker_process_setup_hook" not in submitted:
        runtime_env["worker_process_setup_hook"] = f"{ast_guard.__name__}.{ast_guard.install.__name__}"
    return runtime_env or None


@contextlib.contextmanager
def ray_session(address: str | None, env_vars: dict[str, str] | None = None, num_cpus: int | None = None) -> Iterator[bool]:
    """Ray for one job: the caller's connection when it has one, else the cluster at ``address`` or
    ``$RAY_ADDRESS``, else a private local instance on 127.0.0.1 (``num_cpus``: its CPUs, default all).

    ``env_vars`` go into the job's runtime env, so that its tasks and actors run in the
    job's own workers with them (a setting the submitter made wins). On the Python releases
    with the ``ast.parse`` race (:mod:`pipeline.ast_guard`), the job's worker processes install
    the guard at start (Ray's ``worker_process_setup_hook``, unless the submitter set one).
    Yields True when a local instance was started; shuts Ray down on exit when it was
    initialized here.
    """
    import ray

    if ray.is_initialized():
        yield False
        return
    runtime_env = job_runtime_env(env_vars)
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True, logging_level=logging.WARNING)
    else:
        # a local instance for this job only: on 127.0.0.1, without token auth (which would also write
        # ~/.ray/auth_token and so turn auth on for every later `ray start` on the machine)
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(
            address="local",
            num_cpus=num_cpus,
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            runtime_env=runtime_env,
            log_to_driver=True,
            logging_level=logging.WARNING,
        )
    try:
        yield not address
    finally:
        ray.shutdown()
