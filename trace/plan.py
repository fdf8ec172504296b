"""Which stages and layers a trace captures: the ``--stages`` / ``--layers`` grammar."""
from __future__ import annotations

import re

from engine import failpoints
from trace.stages import ALIASES, STAGE_INDEX, STAGES, WHOLE_MODEL_STAGES

_NUMBER = re.compile(r"[0-9]+")
_RANGE = re.compile(r"([0-9]+)\s*-\s*([0-9]+)")
_NEGATIVE = re.compile(r"-\s*[0-9]+")
_VALID_STAGES = ", ".join(("all",) + STAGES + tuple(f"{a} (= {s})" for a, s in ALIASES.items()))


class PlanError(ValueError):
    """A bad ``--stages`` or ``--layers`` value; the message is one line."""


def parse_stages(text: str) -> tuple[str, ...]:
    """Parse a comma list of stage names (or aliases, or ``all``) into forward order."""
    chosen = set()
    for item in text.split(","):
        name = item.strip().lower()
        if name == "all":
            chosen.update(STAGES)
        elif name in STAGE_INDEX or name in ALIASES:
            chosen.add(ALIASES.get(name, name))
        else:
            what = f"unknown stage {item.strip()!r}" if name else f"empty stage name in {text!r}"
            raise PlanError(f"{what}; valid stages: {_VALID_STAGES}")
    return tuple(s for s in STAGES if s in chosen)


def _model_layers(n_layers: int) -> str:
    span = f" (0-{n_layers - 1})" if n_layers > 0 else ""
    return f"the model has {n_layers} layers{span}"


def _parse_layer_item(item: str, text: str, n_layers: int) -> range:
    if item.lower() == "all":
        return range(n_layers)
    if _NUMBER.fullmatch(item):
        lo = hi = int(item)
    elif m := _RANGE.fullmatch(item):
        lo, hi = int(m[1]), int(m[2])
        if lo > hi:
            raise PlanError(f"layer range {item!r} is reversed; {_model_layers(n_layers)}")
    elif _NEGATIVE.fullmatch(item):
        raise PlanError(f"layer {item!r} is negative; {_model_layers(n_layers)}")
    else:
        what = f"malformed layer spec {item!r} in {text!r}" if item else f"empty layer spec in {text!r}"
        raise PlanError(f"{what}: expected N, A-B or all; {_model_layers(n_layers)}")
    if hi >= n_layers:
        raise PlanError(f"layer {hi} is out of range: {_model_layers(n_layers)}")
    if failpoints.active("plan.range_exclusive"):
        return range(lo, hi)
    return range(lo, hi + 1)


def parse_layers(text: str, n_layers: int) -> tuple[int, ...]:
    """Parse ``0-3`` (inclusive), ``5``, ``0-3,7`` or ``all`` into sorted unique layer indices."""
    chosen = set()
    for item in text.split(","):
        chosen.update(_parse_layer_item(item.strip(), text, n_layers))
    return tuple(sorted(chosen))


class TracePlan:
    """A selection of stages and layers; whole-model stages ignore the layer selection."""

    def __init__(self, stages, layers):
        unknown = [s for s in stages if s not in STAGE_INDEX]
        if unknown:
            raise PlanError(f"unknown stage {unknown[0]!r}; valid stages: {', '.join(STAGES)}")
        self._stages = frozenset(stages)
        self._layers = frozenset(layers)
        self.stages = tuple(s for s in STAGES if s in self._stages)
        self.layers = tuple(sorted(self._layers))

    @classmethod
    def parse(cls, stages_text: str, layers_text: str, n_layers: int) -> "TracePlan":
        """Build a plan from ``--stages`` and ``--layers`` text."""
        return cls(parse_stages(stages_text), parse_layers(layers_text, n_layers))

    def wants(self, stage: str, layer: int | None) -> bool:
        """Whether (stage, layer) is captured; the forward passes layer None for whole-model stages."""
        if stage not in self._stages:
            return False
        return stage in WHOLE_MODEL_STAGES or layer in self._layers

    def __repr__(self):
        return f"TracePlan(stages={self.stages!r}, layers={self.layers!r})"


# Stages whose values are [heads, query, key] rather than [token, dim].
ATTENTION_STAGES = ("attn_scores", "attn_softmax")


def planned_keys(plan: TracePlan) -> list[tuple[str, int | None]]:
    """Every (stage, layer) the plan captures, in the order the forward computes them."""
    per_layer = [s for s in plan.stages if s not in WHOLE_MODEL_STAGES]
    keys = [("embedding", None)] if "embedding" in plan.stages else []
    keys += [(s, layer) for layer in plan.layers for s in per_layer]
    return keys + [(s, None) for s in ("final_norm", "lm_head") if s in plan.stages]
