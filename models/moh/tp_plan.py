"""MoH's split: whole heads per rank (shared and routed alike); the router is replicated so
every rank routes every token over all heads without a collective (see mixer.py)."""

from plait.models.common.tp_plan import ATTENTION, REPLICATED

PLAN = {"M": {**ATTENTION, "w_routed": REPLICATED, "w_shared": REPLICATED, "w_mix": REPLICATED}}
