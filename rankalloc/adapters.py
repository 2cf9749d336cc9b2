"""Gated LoRA: ``y = W x + s * B diag(g) A x`` around any Linear-like base layer, or ``W_e + s * B_e diag(g) A_e``
for every expert ``e`` of a fused expert weight; inject and remove.

``GatedModel`` owns the wrapped model and keeps the three parameter groups of the bilevel search
apart, as DARTS keeps ``arch_parameters()`` apart from ``parameters()``:

* ``weight_parameters()`` - LoRA A and B of every target, plus the task head (weight steps);
* ``gate_parameters()``   - the ``log_alpha`` of every rank gate (gate steps);
* the Lagrange multiplier lives in :mod:`rankalloc.lagrangian` (dual steps).
"""
from __future__ import annotations

import contextlib
import logging
import math
from typing import Iterator

import torch
from torch import nn
from torch.nn.utils import parametrize

from .families import Classification, Family, Output
from .gates import MODES, make_gates
from .targets import Target, expert_shape, head_parameters, linear_shape

logger = logging.getLogger(__name__)


class GatedLoRA(nn.Module):
    """A frozen base layer plus a LoRA of rank ``r_max`` whose components are gated."""

    def __init__(self, base_layer: nn.Module, r_max: int, scale: float, dropout: float = 0.0,
                 init_keep: float = 0.9, temperature: float = 0.5, gates: str = "hard_concrete") -> None:
        super().__init__()
        d_in, d_out = linear_shape(base_layer)
        self.base_layer = base_layer
        self.in_features, self.out_features, self.r_max = d_in, d_out, r_max
        self.scale = float(scale)
        weight = base_layer.weight
        self.lora_A = nn.Parameter(torch.empty(r_max, d_in, dtype=torch.float32, device=weight.device))
        self.lora_B = nn.Parameter(torch.zeros(d_out, r_max, dtype=torch.float32, device=weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as peft: B = 0, so training starts at W
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.gates = make_gates(gates, r_max, init_keep, temperature).to(weight.device)
        self.calls = 0  # forward passes through this layer (a layer whose weight the model reads directly has none)

    # Model code that reads the wrapped layer's parameters (T5 checks ``wo.weight.dtype``) sees the base
    # layer's, as it does through peft's LoRA layers.
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base_layer, "bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        result = self.base_layer(x)
        g = self.gates()
        h = self.dropout(x).to(self.lora_A.dtype)
        return result + (self.scale * ((h @ self.lora_A.t()) * g) @ self.lora_B.t()).to(result.dtype)


class GatedExpertLoRA(nn.Module):
    """A parametrization of a fused expert weight (``experts x out x in``, or ``experts x in x out`` where its
    module says ``is_transposed``): ``W_e + s * B_e diag(g) A_e`` for every expert ``e``, one gate per rank-1
    component shared by all experts, as one peft rank gives every expert a component.  The model reads the
    weight directly, so the update is added to the weight rather than to the output: like peft's
    ``target_parameters`` layers, it takes no dropout."""

    def __init__(self, owner: nn.Module, param_name: str, r_max: int, scale: float, init_keep: float = 0.9,
                 temperature: float = 0.5, gates: str = "hard_concrete") -> None:
        super().__init__()
        experts, d_in, d_out = expert_shape(owner, param_name)
        weight = getattr(owner, param_name)
        self.experts, self.in_features, self.out_features, self.r_max = experts, d_in, d_out, r_max
        self.transposed = bool(getattr(owner, "is_transposed", False))
        self.scale = float(scale)
        self.lora_A = nn.Parameter(torch.empty(experts, r_max, d_in, dtype=torch.float32, device=weight.device))
        self.lora_B = nn.Parameter(torch.zeros(experts, d_out, r_max, dtype=torch.float32, device=weight.device))
        nn.init.kaiming_uniform_(self.lora_A.data.view(experts * r_max, d_in), a=math.sqrt(5))  # peft's, per expert
        self.gates = make_gates(gates, r_max, init_keep, temperature).to(weight.device)
        self.calls = 0

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        gated_B = (self.lora_B * (self.scale * self.gates())).to(weight.dtype)  # (experts, out, r)
        A = self.lora_A.to(weight.dtype)  # (experts, r, in)
        if self.transposed:  # W_e + (B_e A_e)^T = W_e + A_e^T B_e^T
            return torch.baddbmm(weight, A.transpose(1, 2), gated_B.transpose(1, 2))
        return torch.baddbmm(weight, gated_B, A)  # one tensor the size of the weight, no separate update


class GatedModel(nn.Module):
    """A base model whose targets are wrapped with :class:`GatedLoRA`."""

    def __init__(self, model: nn.Module, targets: list[Target], r_max: dict[str, int], scale: float,
                 dropout: float = 0.0, init_keep: float = 0.9, temperature: float = 0.5,
                 family: Family | None = None, gates: str = "hard_concrete") -> None:
        super().__init__()
        self.model = model
        self.family = family or Classification()
        self.targets = list(targets)
        self.layers: dict[str, GatedLoRA | GatedExpertLoRA] = {}
        for t in self.targets:
            parent, attr = _parent(model, t.name)
            if t.experts:
                layer = GatedExpertLoRA(parent, attr, r_max[t.name], scale, init_keep, temperature, gates)
                parametrize.register_parametrization(parent, attr, layer, unsafe=True)  # unsafe: no trial call
            else:
                layer = GatedLoRA(getattr(parent, attr), r_max[t.name], scale, dropout, init_keep, temperature, gates)
                setattr(parent, attr, layer)
            self.layers[t.name] = layer
        self._costs = {t.name: t.cost_per_rank for t in self.targets}

    def forward(self, **batch) -> Output:
        """The task family's loss and outputs (see :mod:`rankalloc.families`).  A fused expert weight is
        computed once per forward pass (one gate sample), however many experts read it."""
        with parametrize.cached():
            return self.family.forward(self.model, batch)

    def warn_idle_targets(self) -> None:
        """Warn about targets whose forward never ran (in this process): the model reads their weight
        directly (Mamba's ``dt_proj``) or never reaches them (an unused layer group, an expert never routed
        to), so an adapter there does nothing, in this search and in peft alike, yet is charged to the budget."""
        idle = [name for name, layer in self.layers.items() if layer.calls == 0]
        if idle:
            logger.warning("%d of %d adapter targets never ran in a forward pass of this search (%s%s): the model "
                           "reads their weights directly or never reaches them, so an adapter there does nothing "
                           "yet costs budget; leave them out with --model.target_regex", len(idle),
                           len(self.layers), ", ".join(idle[:3]), ", ..." if len(idle) > 3 else "")

    # ---- parameter groups ---------------------------------------------------------------------------
    def adapter_parameters(self) -> list[nn.Parameter]:
        return [p for layer in self.layers.values() for p in (layer.lora_A, layer.lora_B)]

    def weight_parameters(self) -> list[nn.Parameter]:
        """Adapter A and B plus the task head: what weight steps update."""
        return self.adapter_parameters() + head_parameters(self.model)

    def gate_parameters(self) -> list[nn.Parameter]:
        """The rank gates: what gate steps update."""
        return [layer.gates.log_alpha for layer in self.layers.values()]

    # ---- gates and cost -----------------------------------------------------------------------------
    def set_gate_mode(self, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"gate mode must be one of {MODES}, got {mode!r}")
        for layer in self.layers.values():
            layer.gates.mode = mode

    @contextlib.contextmanager
    def gate_mode(self, mode: str) -> Iterator[None]:
        before = next(iter(self.layers.values())).gates.mode
        self.set_gate_mode(mode)
        try:
            yield
        finally:
            self.set_gate_mode(before)

    def set_temperature(self, temperature: float) -> None:
        for layer in self.layers.values():
            layer.gates.temperature = float(temperature)

    def expected_cost(self) -> torch.Tensor:
        """C(gates) = sum over layers and components of P(keep) * (d_in + d_out); differentiable."""
        return sum(layer.gates.keep_prob().sum() * self._costs[name] for name, layer in self.layers.items())

    def max_cost(self) -> int:
        return sum(layer.r_max * self._costs[name] for name, layer in self.layers.items())

    def keep_probs(self) -> dict[str, list[float]]:
        return {name: layer.gates.keep_prob().detach().cpu().tolist() for name, layer in self.layers.items()}

    def set_hard_ranks(self, ranks: dict[str, int]) -> None:
        for name, layer in self.layers.items():
            layer.gates.set_hard_rank(int(ranks[name]))

    @torch.no_grad()
    def project_cost_(self, target: float, iterations: int = 40) -> float:
        """Shift every gate by one common offset so that the expected cost equals ``target``.

        The expected cost is increasing in the offset, so bisection finds it; the order of the
        components (what the knapsack ranks by) is unchanged.  Returns the offset applied.  (What
        the offset shifts is the gates' own choice: every logit for hard-concrete gates, a tilt by rank
        for nested ones.)
        """
        lo, hi = -100.0, 100.0  # twice the logit bound: from any gates to any reachable target
        for _ in range(iterations):
            mid = 0.5 * (lo + hi)
            cost = sum(float(layer.gates.keep_prob_shifted(mid).sum()) * self._costs[name]
                       for name, layer in self.layers.items())
            lo, hi = (mid, hi) if cost < target else (lo, mid)
        offset = 0.5 * (lo + hi)
        for layer in self.layers.values():
            layer.gates.shift_(offset)
        self.clamp_gates_()
        return offset

    def clamp_gates_(self) -> None:
        """Bound every gate's logits as its kind does (see ``clamp_`` of each gate class)."""
        for layer in self.layers.values():
            layer.gates.clamp_()

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """LoRA weights and gates only (the base model is frozen and reloaded from its source)."""
        state = {}
        for name, layer in self.layers.items():
            state[f"{name}.lora_A"] = layer.lora_A.detach().cpu()
            state[f"{name}.lora_B"] = layer.lora_B.detach().cpu()
            state[f"{name}.log_alpha"] = layer.gates.log_alpha.detach().cpu()
        return state


def remove_gated_lora(gated: GatedModel) -> nn.Module:
    """Put the original base layers back and return the plain model."""
    for name, layer in gated.layers.items():
        parent, attr = _parent(gated.model, name)
        if isinstance(layer, GatedExpertLoRA):
            parametrize.remove_parametrizations(parent, attr, leave_parametrized=False)
        else:
            setattr(parent, attr, layer.base_layer)
    gated.layers = {}
    return gated.model


@contextlib.contextmanager
def trainable_only(params: list[nn.Parameter], others: list[nn.Parameter]) -> Iterator[None]:
    """Let gradients reach ``params`` alone: ``others`` are frozen for the duration."""
    saved = [p.requires_grad for p in others]
    for p in others:
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p, flag in zip(others, saved):
            p.requires_grad_(flag)


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, attr = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), attr
