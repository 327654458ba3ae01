"""``gradstep list`` and ``gradstep info``: every registered optimizer, or one in full."""

from __future__ import annotations

import argparse
import json
from typing import Any

import torch

from ...core.hypers import REQUIRED, Hyper
from ...core.registry import Entry, entries
from .common import (
    _CORE,
    PROG,
    _defaults,
    _entry,
    _fmt_spec,
    _fmt_value,
    _jsonable,
    _required,
    _table,
)


def _instance(entry: Entry) -> torch.optim.Optimizer:
    """A throwaway instance with the entry's defaults (a preset's required values get a placeholder)."""
    placeholders = {k: entry.example.get(k, 1e-3) for k in entry.required_args}
    return entry([torch.nn.Parameter(torch.zeros(4, 4))], **placeholders)


def _declared(entry: Entry) -> dict[str, Hyper]:
    declared = getattr(_instance(entry), "declared_hypers", None)
    return declared() if callable(declared) else {}


def _key_hypers(defaults: dict[str, Any]) -> dict[str, Any]:
    """The hyperparameters worth a compact listing: the algorithm's own, lr, weight decay, and core options whose
    default this optimizer changes (AdamW's decoupled decay)."""
    keep = {"lr", "weight_decay"}
    chosen = {
        k: v
        for k, v in defaults.items()
        if k not in _CORE or k in keep or (v is not REQUIRED and v != _CORE[k].default)
    }
    # lr first: it is what one reads and changes first.
    return dict(sorted(chosen.items(), key=lambda kv: kv[0] != "lr"))


def _short_paper(paper: str) -> str:
    """``"Kingma & Ba, 2015. Adam: ..."`` -> ``"Kingma & Ba, 2015"``."""
    return paper.split(". ", 1)[0].split("; ", 1)[0]


def _describe(entry: Entry) -> dict[str, Any]:
    """Everything ``list --json`` and ``info --json`` say about one optimizer."""
    caps = entry.capabilities
    defaults = _defaults(entry)
    declared = _declared(entry)
    return {
        "name": entry.name,
        "class": f"{entry.cls.__module__}.{entry.cls.__qualname__}",
        "summary": entry.summary,
        "paper": entry.paper,
        "originals": list(entry.originals),
        "preset": _jsonable(entry.preset),
        "required": _required(entry),
        "hyperparameters": _jsonable(defaults),
        "docs": {name: declared[name].doc for name in defaults if name in declared},
        "core_hyperparameters": [name for name in defaults if name in _CORE],
        "example": _fmt_spec(entry.name, entry.example),
        "capabilities": {
            "state_tensors": caps.state_tensors,
            "state_bytes_per_param": caps.state_bytes_per_param,
            "supports_complex": caps.supports_complex,
            "supports_sparse": caps.supports_sparse,
            "closure_required": caps.closure_required,
            "sharding": caps.sharding,
        },
    }


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def _cmd_list(args: argparse.Namespace) -> int:
    all_entries = entries()
    if args.json:
        print(json.dumps([_describe(e) for e in all_entries], indent=2))
        return 0
    if args.verbose:
        print("\n\n".join(_info_text(e) for e in all_entries))
        return 0
    rows = [["name", "state/param", "complex", "sharding", "paper", "summary"]]
    details = []
    for e in all_entries:
        caps = e.capabilities
        rows.append(
            [e.name, f"{caps.state_bytes_per_param} B", _yes(caps.supports_complex), caps.sharding]
            + [_short_paper(e.paper), e.summary]
        )
        key = _key_hypers(_defaults(e))
        details.append(
            [
                "    originals: " + ("; ".join(e.originals) if e.originals else "-"),
                "    " + "  ".join(f"{k}={_fmt_value(v)}" for k, v in key.items()),
            ]
        )
    header, *body = _table(rows)
    print(header)
    for line, lines in zip(body, details):
        print(line)
        print("\n".join(lines))
    print(
        f"\n{len(all_entries)} optimizers. `{PROG} info NAME` or `{PROG} list --verbose`: the full paper reference and"
    )
    print(
        "every hyperparameter with its doc. Core options shared by all (foreach, nonfinite, ...) are not shown above."
    )
    return 0


def _info_text(entry: Entry) -> str:
    d = _describe(entry)
    caps = d["capabilities"]
    defaults = _defaults(entry)
    lines = [
        f"{entry.name}: {entry.summary}",
        f"  class:      {d['class']}",
        f"  paper:      {entry.paper}",
        "  originals:  " + ("\n              ".join(entry.originals) if entry.originals else "-"),
        f"  state:      {caps['state_bytes_per_param']} bytes per float32 parameter element "
        f"({caps['state_tensors']} parameter-sized tensor(s))",
        f"  complex:    {_yes(caps['supports_complex'])}   sparse: {_yes(caps['supports_sparse'])}   "
        f"closure required: {_yes(caps['closure_required'])}",
        f"  sharding:   {caps['sharding']}",
    ]
    if entry.preset:
        preset = ", ".join(f"{k}={_fmt_value(v)}" for k, v in entry.preset.items())
        lines.append(f"  preset of:  {entry.cls.__name__} with {preset}")
    if entry.example:
        lines.append(f'  example:    {PROG} compare "{d["example"]}"')
    for title, names in (
        ("hyperparameters", [k for k in defaults if k not in _CORE]),
        ("core options (every gradstep optimizer)", [k for k in defaults if k in _CORE]),
    ):
        if not names:
            continue
        lines.append(f"  {title}:")
        rows = [[name, _fmt_value(defaults[name]), d["docs"].get(name, "")] for name in names]
        lines.extend("    " + line for line in _table(rows))
    return "\n".join(lines)


def _cmd_info(args: argparse.Namespace) -> int:
    entry = _entry(args.name)
    if args.json:
        print(json.dumps(_describe(entry), indent=2))
    else:
        print(_info_text(entry))
    return 0
