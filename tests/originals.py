"""Import helpers for the reference implementations the parity tests compare against (see gradstep.lab.peers)."""

from __future__ import annotations

from gradstep.lab.peers import holocron_optim

__all__ = ["holocron_optim"]
