"""The registry of pretraining methods: ``config method: NAME`` picks ``METHODS[NAME]``.

A new method is a :class:`~pretrain.methods.base.Method` subclass in its own file plus one line here
(see ``docs/pretraining.md``, "Adding a method").
"""

from __future__ import annotations

from pretrain.methods.base import Method
from pretrain.methods.mocov2 import MoCoV2
from pretrain.methods.simclr import SimCLR

METHODS: dict[str, type[Method]] = {
    MoCoV2.name: MoCoV2,
    SimCLR.name: SimCLR,
}

__all__ = ["METHODS", "Method"]
