"""``gradstep bench``: the speed benchmark (:mod:`gradstep.lab.bench`), with its errors as one line."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import NoReturn

import torch

from ...core.registry import get
from .common import (
    RUNTIME_ERROR,
    CommandError,
    _check_file_writable,
)


def _option_values(argv: Sequence[str], option: str) -> list[str]:
    """The values given to ``option`` in ``argv`` (``--opt a b``, ``--opt=a``), for checks before the run."""
    values: list[str] = []
    for i, arg in enumerate(argv):
        if arg == option:
            for value in argv[i + 1 :]:
                if value.startswith("-") and not _is_number(value):
                    break
                values.append(value)
        elif arg.startswith(option + "="):
            values.append(arg.split("=", 1)[1])
    return values


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _cmd_bench(argv: list[str]) -> int:
    """``gradstep bench ...``: :func:`gradstep.lab.bench.main` with its errors as one line (see :func:`main`)."""
    from .. import bench

    for name in _option_values(argv, "--only"):
        try:
            get(name)
        except ValueError as exc:
            raise CommandError(f"bench: --only: {exc}") from None
    for path in _option_values(argv, "--json")[-1:]:
        _check_file_writable(path, "bench: --json")
    before = torch.get_num_threads()
    original = argparse.ArgumentParser.error

    def error(self: argparse.ArgumentParser, message: str) -> NoReturn:
        raise CommandError(f"bench: {message}")

    # bench.main builds its own argparse parser: its usage errors are made one line here, for its run only.
    argparse.ArgumentParser.error = error  # type: ignore[method-assign]
    try:
        return int(bench.main(argv) or 0)
    except (ValueError, OSError) as exc:
        raise CommandError(f"bench: {exc}", RUNTIME_ERROR) from None
    finally:
        argparse.ArgumentParser.error = original  # type: ignore[method-assign]
        torch.set_num_threads(before)
