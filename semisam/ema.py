"""The EMA ("mean") teacher: θ' ← d·θ' + (1 − d)·θ after every optimizer step (handbook §7).

As in the mean-teacher reference implementation, the decay used at update ``n`` (counted from
0) is ``min(d, 1 − 1/(n + 1))``: the first updates follow the student closely, so a short
schedule does not validate (and keep) an average still dominated by the random start.
"""

from __future__ import annotations

import copy

import torch


class EMATeacher:
    """A frozen copy of the student whose weights follow the student's exponential moving
    average. Buffers (none in the Slicing-SAM3D decoder, but kept general) are copied."""

    def __init__(self, student: torch.nn.Module, decay: float = 0.99):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = float(decay)
        self.model = copy.deepcopy(_unwrap(student)).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.updates = 0

    @torch.no_grad()
    def update(self, student: torch.nn.Module) -> None:
        src = _unwrap(student)
        d = min(self.decay, 1.0 - 1.0 / (self.updates + 1))
        for ema_p, p in zip(self.model.parameters(), src.parameters()):
            ema_p.mul_(d).add_(p.detach().to(ema_p.dtype), alpha=1.0 - d)
        for ema_b, b in zip(self.model.buffers(), src.buffers()):
            ema_b.copy_(b)
        self.updates += 1

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "decay": self.decay, "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.decay = float(state.get("decay", self.decay))
        self.updates = int(state.get("updates", 0))


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside DistributedDataParallel / torch.compile wrappers."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return getattr(model, "_orig_mod", model)
