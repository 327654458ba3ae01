"""Import helpers for the reference implementations the parity tests compare against (see gradstep.peers)."""

from __future__ import annotations

from gradstep.peers import holocron_optim

__all__ = ["holocron_optim"]
