"""Argument parsers shared by the CLI subcommands: comma-separated lists, the few-shot prefix, flags from configs."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from entitylens.errors import EntitylensError


def csv_list(value: str) -> tuple[str, ...]:
    """``"a, b,c"`` → ``("a", "b", "c")`` (empty items dropped)."""
    return tuple(v.strip() for v in value.split(",") if v.strip())


def layer_list(value: str) -> tuple[int, ...] | None:
    """``"0,3,5"`` → ``(0, 3, 5)``; ``"all"`` → ``None`` (every layer)."""
    if value.strip() == "all":
        return None
    try:
        return tuple(int(v) for v in csv_list(value))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--layers {value!r} must be 'all' or comma-separated integers") from None


def int_list(value: str) -> tuple[int, ...]:
    """``"1,2,4"`` → ``(1, 2, 4)``."""
    try:
        out = tuple(int(v) for v in csv_list(value))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} must be comma-separated integers") from None
    if not out:
        raise argparse.ArgumentTypeError("give at least one integer")
    return out


def float_list(value: str) -> tuple[float, ...]:
    """``"0.1,1,10"`` → ``(0.1, 1.0, 10.0)``."""
    try:
        return tuple(float(v) for v in csv_list(value))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} must be comma-separated numbers") from None


def kst24_prefix() -> str:
    """Return the KST24 2-shot prompt up to (and including) the test's ``Description: ``."""
    from entitylens.task.prompts import kst24_prompt

    marker = "Box 0 contains nothing."
    full = kst24_prompt(marker)
    if not full.endswith(marker):  # pragma: no cover - guards a change in the prompt layout
        raise EntitylensError("the KST24 prompt no longer ends with the test description; use --prefix-file")
    return full[: -len(marker)]


def read_prefix(args: Any) -> str:
    """The few-shot prefix selected by ``--prefix-file FILE`` or ``--kst24-prefix`` (empty if neither)."""
    if args.prefix_file is not None:
        if not args.prefix_file.is_file():
            raise EntitylensError(f"prefix file {args.prefix_file} does not exist; pass an existing --prefix-file")
        return args.prefix_file.read_text(encoding="utf-8")
    if args.kst24_prefix:
        return kst24_prefix()
    return ""


def parse_batch_size(value: str, flag: str = "--batch-size") -> int | Literal["auto"]:
    """``"auto"`` or a positive integer, from a command-line string.

    Raises:
        EntitylensError: Neither ``auto`` nor an integer >= 1.

    """
    if value == "auto":
        return "auto"
    try:
        n = int(value)
    except ValueError:
        raise EntitylensError(f"{flag} {value!r} is not an integer; pass e.g. 8 or 'auto'") from None
    if n < 1:
        raise EntitylensError(f"{flag} must be >= 1, got {n}")
    return n


# ------------------------------------------------------------------------------------ flags from configs


def attribute_help(cls: type) -> dict[str, str]:
    """Field -> its description, from the ``Attributes:`` section of ``cls``'s (and its bases') docstrings."""
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        doc = inspect.getdoc(klass) or ""
        if "Attributes:" not in doc:
            continue
        section = doc.split("Attributes:", 1)[1]
        name = None
        for line in section.splitlines():
            if line and not line.startswith(" "):
                break  # the next section
            m = re.match(r"^ {4}(\w+): ?(.*)$", line)
            if m:
                name = m.group(1)
                out[name] = m.group(2).strip()
            elif name and line.strip():
                out[name] += " " + line.strip()
    return {k: v.replace("``", "") for k, v in out.items()}


def _flat(values: Sequence[str]) -> tuple[str, ...]:
    return tuple(v for item in values for v in csv_list(item))


def _ints(values: Sequence[str], flag: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in values)
    except ValueError:
        raise EntitylensError(f"{flag} {' '.join(values)!r} must be integers (or 'all')") from None


def _kind(tp: Any) -> tuple[str, Any]:
    """How a field's annotation becomes a flag: (kind, detail)."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(args) == 1:
        return _kind(args[0])
    if tp is bool:
        return "bool", None
    if typing.get_origin(tp) is tuple:
        return "tuple", typing.get_args(tp)[0]
    if typing.get_origin(tp) is typing.Literal:
        return "choice", typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):  # int | Literal["auto"]
        return "batch", None
    return "scalar", tp


def add_config_args(
    parser: argparse.ArgumentParser,
    cls: type,
    *,
    skip: Sequence[str] = (),
    defaults: Mapping[str, Any] | None = None,
    flags: Mapping[str, str] | None = None,
) -> None:
    """Add one flag per field of the frozen dataclass ``cls``: the flags come from the config, not a copy of it.

    The flag is ``--field-name``; its help is the field's ``Attributes:`` entry; its default the field's
    default (or ``defaults[field]``). ``bool`` fields are switches (``--x`` / ``--no-x`` when they default to
    true), tuples take one or more values (commas also split them), ``Literal`` fields are choices,
    ``int | Literal["auto"]`` takes an integer or ``auto``, ``X | None`` fields default to ``None``.

    Args:
        parser: The parser to add to.
        cls: The configuration class.
        skip: Fields with no flag (the command sets them itself).
        defaults: Field -> default shown and used (overrides the dataclass's).
        flags: Field -> flag name (default ``--field-name``).
    """
    helps = attribute_help(cls)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        default = (defaults or {}).get(f.name, f.default)
        if default is dataclasses.MISSING:
            factory = f.default_factory
            default = factory() if callable(factory) else None
        flag = (flags or {}).get(f.name, "--" + f.name.replace("_", "-"))
        kind, detail = _kind(hints[f.name])
        text = helps.get(f.name, "")
        value = ",".join(map(str, default)) if isinstance(default, tuple) else default
        shown = "" if default in (None, False, ()) else f" (default {value})"
        kw: dict[str, Any] = {"dest": f.name, "default": default, "help": text + shown}
        if kind == "bool":
            kw["action"] = argparse.BooleanOptionalAction if default else "store_true"
        elif kind == "tuple":
            kw.update(nargs="+", metavar=f.name.upper().rstrip("S") or f.name.upper())
        elif kind == "choice":
            kw["choices"] = detail
        elif kind == "batch":  # parsed by config_from_args, so a bad value is a one-line error
            kw["type"] = str
        else:
            kw["type"] = detail if detail in (int, float, Path) else str
        parser.add_argument(flag, **kw)


def config_from_args(cls: type, args: argparse.Namespace, **fixed: Any) -> Any:
    """Build ``cls`` from the flags :func:`add_config_args` added (comma lists split), plus ``fixed`` fields."""
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name in fixed or not hasattr(args, f.name):
            continue
        v = getattr(args, f.name)
        kind, item = _kind(hints[f.name])
        if kind == "tuple" and isinstance(v, list):  # given on the command line (a default stays as it is)
            v = _flat(v)
            if item is int:
                v = None if v == ("all",) else _ints(v, "--" + f.name.replace("_", "-"))
        elif kind == "batch" and isinstance(v, str):
            v = parse_batch_size(v, "--" + f.name.replace("_", "-"))
        values[f.name] = v
    return cls(**values, **fixed)


def add_vllm_args(p: Any, engine_help: str) -> None:
    """Add ``--engine`` and vLLM's placement flags, shared by ``eval`` and ``cache``.

    The flags: ``--tensor-parallel-size``, ``--gpu-memory-utilization``, ``--max-model-len``.
    """
    p.add_argument("--engine", choices=("native", "vllm"), default="native", help=engine_help)
    p.add_argument("--tensor-parallel-size", type=int, default=1, help="vLLM: GPUs one model is split over")
    p.add_argument("--gpu-memory-utilization", type=float, default=None,
                   help="vLLM: fraction of device memory to reserve (default 0.9 on a GPU, 0.25 on CPU)")
    p.add_argument("--max-model-len", type=int, default=None, help="vLLM: context to reserve KV cache for")


def vllm_options(args: Any) -> Any:
    """The :class:`~entitylens.models.vllm_support.VLLMOptions` of :func:`add_vllm_args`' flags."""
    from entitylens.models.vllm_support import VLLMOptions

    return VLLMOptions(tensor_parallel_size=args.tensor_parallel_size,
                       gpu_memory_utilization=args.gpu_memory_utilization, max_model_len=args.max_model_len)
