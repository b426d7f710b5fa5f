"""Block solvers: one registry entry per ODE solver, all driving a diffusers flow-match scheduler.

``euler`` uses ``FlowMatchEulerDiscreteScheduler`` with explicit sigmas, reproducing the official grid
``linspace(1000, 0, N+1)`` exactly (one model call per step). ``heun`` uses
``FlowMatchHeunDiscreteScheduler`` (second order: two model calls per step except the last, 2N−1 in all,
on its own linear grid σ = 1 … 1/1000).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from diffusers import FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler

from .schedules import NUM_TRAIN_TIMESTEPS, official_sigmas


@dataclass(frozen=True)
class Solver:
    name: str
    scheduler_class: type
    schedule: Callable[[int], dict]  # num_inference_steps -> kwargs of scheduler.set_timesteps
    model_calls: Callable[[int], int]  # num_inference_steps -> model calls per block

    def make_scheduler(self, config=None):
        """A fresh scheduler of this solver's class (from a compatible config if given)."""
        if config is not None and config.get("_class_name") == self.scheduler_class.__name__:
            return self.scheduler_class.from_config(config)
        return self.scheduler_class(num_train_timesteps=NUM_TRAIN_TIMESTEPS, shift=1.0)


SOLVERS = {
    "euler": Solver("euler", FlowMatchEulerDiscreteScheduler, lambda n: {"sigmas": official_sigmas(n)}, lambda n: n),
    "heun": Solver("heun", FlowMatchHeunDiscreteScheduler, lambda n: {"num_inference_steps": n}, lambda n: 2 * n - 1),
}


def get_solver(name: str) -> Solver:
    if name not in SOLVERS:
        raise ValueError(f"`solver` must be one of {sorted(SOLVERS)}, got {name!r}.")
    return SOLVERS[name]
