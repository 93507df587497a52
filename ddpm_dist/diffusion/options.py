"""The sampler options: one typed object for the config's `sample` section, every command line that samples
(built from these fields) and the library. The defaults are declared here and nowhere else; a None in
`steps` or `eta` means "the chosen sampler's own default" (SAMPLER_DEFAULTS)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

SAMPLER_NAMES = ("ddpm", "ddim", "dpm++2m", "dpm++3m", "heun")
SPACINGS = ("uniform", "quadratic", "karras")
VAR_TYPES = ("small", "large")
# steps None = every training step (the DDPM paper's ancestral sampler); eta 1 = DDPM's posterior noise.
# DPM-Solver++ 20 steps: its paper's sweet spot (quality of ~100-step DDIM); Heun 18 steps = 35 model calls,
# EDM's CIFAR-10 setting. eta is unused by the last three (DPM-Solver++ and Heun are ODE solvers).
SAMPLER_DEFAULTS = {
    "ddpm": {"steps": None, "eta": 1.0},
    "ddim": {"steps": 50, "eta": 0.0},
    "dpm++2m": {"steps": 20, "eta": 0.0},
    "dpm++3m": {"steps": 20, "eta": 0.0},
    "heun": {"steps": 18, "eta": 0.0},
}


def model_calls(sampler: str, steps: int) -> int:
    """Network evaluations (NFE) of a sampler over `steps` timesteps: Heun evaluates twice per step except
    the last one (to sigma = 0), every other sampler once (guidance batches both halves into one call)."""
    return 2 * steps - 1 if sampler == "heun" else steps


def steps_for_calls(sampler: str, calls: int) -> int:
    """The most steps whose model calls do not exceed `calls` (at least one step)."""
    return max(1, (calls + 1) // 2) if sampler == "heun" else max(1, calls)


def _opt(default, help_text: str, choices: Optional[tuple] = None):
    return field(default=default, metadata={"help": help_text, "choices": choices})


@dataclass
class SamplerOptions:
    sampler: str = _opt(
        "ddim",
        "reverse process: ddpm (ancestral), ddim, dpm++2m / dpm++3m (DPM-Solver++ multistep, "
        "2nd/3rd order) or heun (EDM's 2nd-order Heun)",
        SAMPLER_NAMES,
    )
    steps: Optional[int] = _opt(
        None,
        "solver steps (timesteps visited). Model calls (NFE): steps for ddpm, ddim and dpm++, "
        "2 x steps - 1 for heun (default: ddpm every training step, ddim 50, dpm++ 20, "
        "heun 18 = 35 calls)",
    )
    eta: Optional[float] = _opt(
        None, "noise of each step: 0 = deterministic DDIM, 1 = DDPM-like (default: ddpm 1, ddim 0)"
    )
    spacing: str = _opt(
        "uniform",
        "timestep spacing over the training steps; karras: EDM's sigma spacing (rho 7) "
        "rounded to the nearest training step",
        SPACINGS,
    )
    var_type: str = _opt("small", "DDPM posterior variance: small (beta tilde) or large (beta)", VAR_TYPES)
    guidance: float = _opt(1.0, "classifier-free guidance scale (1 = none; unconditional models ignore it)")
    clip_x0: bool = _opt(True, "clip the predicted x0 to [-1, 1] at every step")
    # EDM's stochastic Heun (Algorithm 2): S_churn, S_tmin, S_tmax, S_noise; churn 0 = the deterministic ODE.
    churn: float = _opt(0.0, "heun only: EDM's S_churn, noise added before each step (0 = deterministic)")
    churn_sigma_min: float = _opt(0.0, "heun only: EDM's S_tmin, churn only at sigma >= this")
    churn_sigma_max: Optional[float] = _opt(
        None, "heun only: EDM's S_tmax, churn only at sigma <= this (default: no bound)"
    )
    churn_noise: float = _opt(1.0, "heun only: EDM's S_noise, scale of the churn noise")

    @classmethod
    def from_mapping(cls, data: Optional[dict]) -> "SamplerOptions":
        """The known keys of a mapping (a run's config.yaml `sample` section or an export's info may hold more)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in (data or {}).items() if k in names})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def updated(self, **overrides) -> "SamplerOptions":
        """These options with `overrides` (None values are ignored). Steps and eta were chosen for a sampler: a
        different sampler starts from its own defaults for them unless they are overridden too."""
        given = {k: v for k, v in overrides.items() if v is not None}
        base = self
        if given.get("sampler", self.sampler) != self.sampler:
            base = dataclasses.replace(self, steps=None, eta=None)
        return dataclasses.replace(base, **given)

    def resolved(self, num_train_steps: int, conditional: bool = True) -> "SamplerOptions":
        """Every value concrete and checked: steps and eta from the sampler's defaults where unset, guidance 1
        for a model without classes."""
        self.validate()
        defaults = SAMPLER_DEFAULTS[self.sampler]
        steps = self.steps if self.steps is not None else (defaults["steps"] or num_train_steps)
        if not 1 <= steps <= num_train_steps:
            raise ValueError(f"steps: {steps} is not in [1, {num_train_steps}] (the model's training steps)")
        eta = self.eta if self.eta is not None else defaults["eta"]
        return dataclasses.replace(self, steps=steps, eta=eta, guidance=self.guidance if conditional else 1.0)

    def validate(self) -> None:
        """ValueError naming the field: choices, steps >= 1, eta in [0, 1], guidance >= 0."""
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise ValueError(f"{f.name}: '{getattr(self, f.name)}' is not one of {', '.join(choices)}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps: must be positive, got {self.steps}")
        if self.eta is not None and not 0.0 <= self.eta <= 1.0:
            raise ValueError(f"eta: must be in [0, 1], got {self.eta}")
        if self.guidance < 0:
            raise ValueError(f"guidance: must be >= 0, got {self.guidance}")
        for name in ("churn", "churn_sigma_min", "churn_sigma_max", "churn_noise"):
            if (getattr(self, name) or 0) < 0:
                raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)}")

    def describe(self) -> str:
        calls = (
            f" = {model_calls(self.sampler, self.steps)} model calls" if self.sampler == "heun" and self.steps else ""
        )
        return (
            f"{self.sampler}, {self.steps} steps{calls} ({self.spacing}), eta {self.eta}, guidance {self.guidance}"
            + ("" if self.clip_x0 else ", no x0 clipping")
            + (f", churn {self.churn}" if self.churn else "")
        )
