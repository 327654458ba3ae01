"""``gradstep inspect``: what an optimizer checkpoint holds, and a torch.optim one converted to gradstep's."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import torch

from .common import (
    RUNTIME_ERROR,
    CommandError,
    _check_file_writable,
    _table,
)


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _load_checkpoint(path: str, allow_pickle: bool) -> Any:
    import pickle
    import re
    import zipfile

    if not os.path.exists(path):
        raise CommandError(f"inspect: {path}: no such file")
    if os.path.isdir(path):
        raise CommandError(f"inspect: {path}: is a directory")
    try:
        # torch.save writes a zip archive (a pickle, starting with its protocol byte 0x80, before torch 1.6).
        with open(path, "rb") as f:
            legacy = f.read(1) == b"\x80"
        if not (legacy or zipfile.is_zipfile(path)):
            raise CommandError(f"inspect: {path} is not a torch checkpoint (not a file torch.save writes)")
        return torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        refused = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
        if refused and not allow_pickle:
            raise CommandError(
                f"inspect: {path} holds {refused.group(1)} objects, which torch.load(weights_only=True) refuses; "
                "if you trust the file, pass --allow-pickle"
            ) from None
        raise CommandError(f"inspect: {path} cannot be read: {_first_line(text, exc)}") from None
    except OSError as exc:
        raise CommandError(f"inspect: {path}: {exc.strerror or exc}") from None
    except CommandError:
        raise
    except Exception as exc:  # torch.load raises RuntimeError and others for damaged files
        raise CommandError(f"inspect: {path} is not a torch checkpoint: {_first_line(str(exc), exc)}") from None


def _first_line(text: str, exc: BaseException) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def _select_state_dict(obj: Any, path: str, key: str | None) -> tuple[str, dict[str, Any]]:
    from ...tools.checkpoint import find_state_dicts

    found = list(find_state_dicts(obj))
    if key is not None:
        for where, sd in found:
            if where == key:
                return where, sd
        known = ", ".join(repr(w) for w, _ in found) or "none"
        raise CommandError(f"inspect: {path} has no optimizer state_dict at key {key!r} (found: {known})")
    if not found:
        raise CommandError(f"inspect: {path} holds no optimizer state_dict (a dict with 'state' and 'param_groups')")
    if len(found) > 1:
        keys = ", ".join(repr(w) for w, _ in found)
        raise CommandError(f"inspect: {path} holds {len(found)} optimizer state_dicts (at {keys}); choose with --key")
    return found[0]


def _inspect_text(summary: dict[str, Any], path: str, key: str) -> list[str]:
    where = f" (the optimizer state_dict at key {key!r})" if key else ""
    lines = [f"checkpoint: {path}{where}"]
    step = summary["global_step"]
    lines.append(f"optimizer:  {summary['optimizer']}" + (f", global step {step}" if step is not None else ""))
    lines.append(
        f"groups:     {len(summary['groups'])}; parameters: {summary['parameters']} "
        f"({summary['parameters_with_state']} with state)"
    )
    first: dict[str, Any] = {}
    for i, group in enumerate(summary["groups"]):
        hypers = group["hyperparameters"]
        if i == 0:
            first = hypers
            shown = hypers
            rest = ""
        else:
            shown = {k: v for k, v in hypers.items() if first.get(k, object()) != v}
            rest = " (the rest as group 0)" if shown else " (all as group 0)"
        text = "  ".join(f"{k}={v!r}" for k, v in shown.items())
        lines.append(f"  group {i} ({group['params']} params): {text}{rest}".rstrip())
    if summary["state"]:
        rows = [["state", "tensors", "dtype", "elements", "memory", ""]]
        for name, s in summary["state"].items():
            extra = ""
            if "min" in s:
                extra = f"values {s['min']:g}" + (f" .. {s['max']:g}" if s["max"] != s["min"] else "")
            if s["other"]:
                extra = (extra + "; " if extra else "") + f"{s['other']} non-tensor value(s)"
            rows.append(
                [
                    name,
                    str(s["tensors"]),
                    ",".join(s["dtypes"]) or "-",
                    f"{s['elements']:,}",
                    _human_bytes(s["bytes"]),
                    extra,
                ]
            )
        lines.extend("  " + line for line in _table(rows, right=(1, 3, 4)))
    else:
        lines.append("  no state (no step was taken)")
    if summary.get("routes"):
        rows = [["parameter", "shape", "part", "group", "why"]]
        for r in summary["routes"]:
            shape = "x".join(map(str, r["shape"])) or "scalar"
            rows.append([str(r["name"]), shape, str(r["part"]), str(r["group"]), str(r["reason"])])
        lines.append("routing:")
        lines.extend("  " + line for line in _table(rows))
    per = summary["bytes_per_param_element"]
    total = f"state memory: {_human_bytes(summary['state_bytes'])}"
    if per is not None:
        total += f", {per:.2f} bytes per parameter element"
    lines.append(total)
    return lines


def _set_at(container: Any, key: str, value: Any) -> Any:
    """``container`` with the object at the dotted ``key`` replaced by ``value`` (``""``: ``value`` itself)."""
    if not key:
        return value
    head, _, rest = key.partition(".")
    if isinstance(container, dict):
        match = next(k for k in container if str(k) == head)
        container[match] = _set_at(container[match], rest, value)
    elif isinstance(container, list):
        container[int(head)] = _set_at(container[int(head)], rest, value)
    else:  # a tuple: rebuilt
        items = list(container)
        items[int(head)] = _set_at(items[int(head)], rest, value)
        return type(container)(items)
    return container


def _cmd_inspect(args: argparse.Namespace) -> int:
    from ...tools.checkpoint import ConversionError, convert, summarize

    if args.convert_to is not None and args.output is None:
        raise CommandError("inspect: --convert-to needs --output PATH")
    if args.output is not None:
        if args.convert_to is None:
            raise CommandError("inspect: --output needs --convert-to adam|adamw|sgd")
        _check_file_writable(args.output, "--output")
        if os.path.abspath(args.output) == os.path.abspath(args.checkpoint):
            raise CommandError("inspect: --output must not be the checkpoint itself")
    obj = _load_checkpoint(args.checkpoint, args.allow_pickle)
    key, sd = _select_state_dict(obj, args.checkpoint, args.key)
    summary = summarize(sd)
    converted = None
    if args.convert_to is not None:
        try:
            converted = convert(sd, args.convert_to)
        except ConversionError as exc:
            raise CommandError(f"inspect: {args.checkpoint}: {exc}") from None
    if args.json:
        data = {"checkpoint": args.checkpoint, "key": key, **summary}
        if converted is not None:
            data["converted"] = {"to": converted["gradstep"]["optimizer"], "output": args.output}
        print(json.dumps(data, indent=2))
    else:
        print("\n".join(_inspect_text(summary, args.checkpoint, key)))
    if converted is not None:
        try:
            torch.save(_set_at(obj, key, converted), args.output)
        except OSError as exc:
            raise CommandError(f"--output {args.output}: {exc.strerror or exc}", RUNTIME_ERROR) from None
        cls = converted["gradstep"]["optimizer"]
        lookup = "".join(f"[{int(k) if k.isdigit() else repr(k)}]" for k in key.split(".")) if key else ""
        log = sys.stderr if args.json else sys.stdout
        print(f"converted {summary['optimizer']} to gradstep.{cls}: wrote {args.output}", file=log)
        print(f"load it with gradstep.{cls}(params).load_state_dict(torch.load({args.output!r}){lookup})", file=log)
    return 0
