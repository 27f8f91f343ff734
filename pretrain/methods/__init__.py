"""The registry of pretraining methods: ``config method: NAME`` picks ``METHODS[NAME]``.

A new method is a :class:`~pretrain.methods.base.Method` subclass in its own file plus one line here
(see ``docs/pretraining.md``, "Adding a method"). The baselines of the paper's tables (``docs/baselines.md``):
MSCN is a masking kind of ``mocov2``/``simclr`` (``masking.name: mscn``); ADIOS is ``mocov2_adios`` /
``simclr_adios``; the supervised row is ``supervised``.
"""

from __future__ import annotations

from pretrain.methods.adios import MoCoV2Adios, SimCLRAdios
from pretrain.methods.base import Method
from pretrain.methods.mocov2 import MoCoV2
from pretrain.methods.simclr import SimCLR
from pretrain.methods.supervised import Supervised

METHODS: dict[str, type[Method]] = {
    MoCoV2.name: MoCoV2,
    SimCLR.name: SimCLR,
    MoCoV2Adios.name: MoCoV2Adios,
    SimCLRAdios.name: SimCLRAdios,
    Supervised.name: Supervised,
}

__all__ = ["METHODS", "Method"]
