"""What the three samplers share: config handling, the inference schedule, timestep lookup."""

from __future__ import annotations

import numbers

import torch

from ..devices import upload
from .config import check_choice, read_config, split_config
from .schedule import BETA_SCHEDULES, SPACINGS, alphas_cumprod, make_betas, spaced_timesteps

# diffusers' defaults common to DDIM / Euler / Euler-ancestral (used to fill partial config files)
DIFFUSERS_COMMON = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "prediction_type": "epsilon",
    "timestep_spacing": "linspace",
    "steps_offset": 0,
}
# SDXL's training schedule (constructor defaults: ``EulerDiscreteScheduler()`` is SDXL base's)
SDXL_SCHEDULE = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "steps_offset": 1,
                 "timestep_spacing": "leading"}
SDXL_COMMON = dict(DIFFUSERS_COMMON, **SDXL_SCHEDULE)


def sdxl_defaults(common: dict, extra: dict) -> dict:
    """A sampler's constructor defaults: ``common`` (diffusers' defaults it shares with its family)
    on SDXL's training schedule, plus its own options ``extra``."""
    return {**common, **SDXL_SCHEDULE, **extra}


def check_only(scheduler: Scheduler, only: dict) -> None:
    """Refuse options this sampler implements one value of: ``only`` maps each to that value."""
    name = type(scheduler).__name__
    for key, value in only.items():
        if scheduler.config[key] != value:
            raise ValueError(f"{name}: {key}={scheduler.config[key]!r} is not supported (only {value!r})")


class Scheduler:
    """Base class. Subclasses set ``_defaults`` (constructor), ``_diffusers_defaults`` (from_config),
    ``_integer_timesteps`` and implement ``_set_schedule``, ``step``, ``scale_model_input``, ``add_noise``."""

    _defaults: dict = SDXL_COMMON
    _diffusers_defaults: dict = DIFFUSERS_COMMON
    _integer_timesteps = False
    # True where a step depends on earlier calls (multistep history, Heun's half step): such a
    # sampler must be stepped once per evaluation on the whole latent, never once per view
    stateful = False

    @property
    def stochastic(self) -> bool:
        """Whether ``step_at`` adds noise (then pass ``noise=`` — one draw per step for the whole
        latent — or ``generator=``)."""
        return False
    _prediction_types = ("epsilon", "v_prediction")

    def __init__(self, **config):
        name = type(self).__name__
        opts, self.ignored_config = split_config(config, self._defaults, name)
        check_choice(name, "prediction_type", opts["prediction_type"], self._prediction_types)
        check_choice(name, "timestep_spacing", opts["timestep_spacing"], SPACINGS)
        if opts["trained_betas"] is None:
            check_choice(name, "beta_schedule", opts["beta_schedule"], BETA_SCHEDULES)
        T = opts["num_train_timesteps"]
        if isinstance(T, bool) or not isinstance(T, numbers.Integral) or T < 2:
            raise ValueError(f"{name}: num_train_timesteps must be an integer ≥ 2, got {T!r}")
        if isinstance(opts["steps_offset"], bool) or not isinstance(opts["steps_offset"], numbers.Integral):
            raise ValueError(f"{name}: steps_offset must be an integer, got {opts['steps_offset']!r}")
        self.config = {"_class_name": name, **opts}
        # the model's scheduler config kept whole (unknown keys included): another sampler built
        # from this one (``by_name``) takes its options from here, never from a class default.
        # Constructed directly, the model is the one the constructor defaults describe (SDXL's);
        # ``from_config`` replaces this with the file as read.
        self.model_config = {**opts, **config}
        self.betas = make_betas(opts["beta_schedule"], T, opts["beta_start"], opts["beta_end"], opts["trained_betas"])
        if len(self.betas) != T:
            raise ValueError(f"{name}: trained_betas has {len(self.betas)} entries, num_train_timesteps is {T}")
        self.alphas_cumprod = alphas_cumprod(self.betas)  # float32 [T]
        self.num_inference_steps = None
        self.timesteps = None  # set by set_timesteps
        self.timesteps_cpu = None  # the same timesteps kept on the CPU, for host-side control
        self.sigmas = None
        self._lookup = None  # timesteps on the CPU in float64, for index lookup
        self._step_index = None  # diffusers-style counter, used only by stateful ``step`` (multistep, Heun)

    # ------------------------------------------------------------ construction
    @classmethod
    def from_config(cls, cfg, **overrides):
        """Build from a diffusers scheduler config (dict, ``scheduler_config.json``, or a folder
        holding one). Keys missing from it take diffusers' defaults for this class, as diffusers does."""
        source = read_config(cfg)
        merged = dict(cls._diffusers_defaults)
        merged.update(source)
        merged.update(overrides)
        sched = cls(**merged)
        sched.model_config = source
        return sched

    def __repr__(self):
        keys = ", ".join(f"{k}={v!r}" for k, v in self.config.items() if not k.startswith("_"))
        return f"{type(self).__name__}({keys})"

    # ------------------------------------------------------------ schedule
    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        """Make the n-step inference schedule: ``.timesteps`` (descending, on ``device``; also kept on the
        CPU as ``.timesteps_cpu``) and ``.sigmas``."""
        n, T = num_inference_steps, self.config["num_train_timesteps"]
        name = type(self).__name__
        if isinstance(n, bool) or not isinstance(n, numbers.Integral):
            raise TypeError(f"{name}.set_timesteps: num_inference_steps must be an int, got {n!r}")
        if not 1 <= n <= T:
            raise ValueError(f"{name}.set_timesteps: num_inference_steps={n} is out of range; "
                             f"use 1 ≤ n ≤ num_train_timesteps ({T})")
        ts = self._spaced_timesteps(int(n))
        if ts.min() < 0 or ts.max() > T - 1:
            raise ValueError(
                f"{name}.set_timesteps: timestep_spacing={self.config['timestep_spacing']!r} with "
                f"steps_offset={self.config['steps_offset']} and n={n} gives timesteps "
                f"{int(ts.min())}..{int(ts.max())}, outside the trained range 0..{T - 1}; use fewer steps, "
                f"a smaller steps_offset or 'trailing' spacing")
        self.num_inference_steps = int(n)
        self._step_index = None
        self._reset_history()
        timesteps = self._set_schedule(torch.from_numpy(ts.copy()))
        self._lookup = timesteps.double()  # CPU copy for index lookup (no device sync per step)
        self.timesteps_cpu = timesteps
        self.timesteps = timesteps if device is None else upload(timesteps, device)  # no blocking copy

    def _spaced_timesteps(self, n: int):
        """The n spaced training timesteps (float64 numpy, descending) the schedule starts from."""
        return spaced_timesteps(self.config["timestep_spacing"], n, self.config["num_train_timesteps"],
                                self.config["steps_offset"], integer=self._integer_timesteps)

    def _reset_history(self) -> None:
        """Forget what earlier steps left behind (multistep history, Heun's half step)."""

    def _set_schedule(self, ts: torch.Tensor) -> torch.Tensor:
        """Set ``.sigmas`` from the spaced timesteps ``ts`` (float64); return the CPU timesteps."""
        raise NotImplementedError

    # ------------------------------------------------------------ timestep lookup
    def _require_schedule(self, what: str) -> None:
        if self.timesteps is None:
            raise RuntimeError(f"{type(self).__name__}.{what}: call set_timesteps(n) first")

    def _t_values(self, t) -> list[float]:
        """Timestep(s) as Python floats, in the schedule's precision: int, float, 0-d or 1-d tensor."""
        if isinstance(t, torch.Tensor):
            if t.ndim > 1:
                raise ValueError(f"timestep must be a scalar or a 1-d tensor, got shape {tuple(t.shape)}")
            vals = t.detach().reshape(-1).cpu()
            if self.timesteps is not None and self.timesteps.is_floating_point():
                vals = vals.to(self.timesteps.dtype)
            return vals.double().tolist()
        if isinstance(t, numbers.Real) and not isinstance(t, bool):
            v = float(t)
            if self.timesteps is not None and self.timesteps.is_floating_point():
                v = torch.tensor(v, dtype=self.timesteps.dtype).item()  # round to the schedule's dtype
            return [v]
        raise TypeError(f"timestep must be a number or a tensor, got {type(t).__name__}")

    def index_for_timestep(self, t) -> int:
        """Position of the single timestep ``t`` in ``.timesteps`` (found anew on every call)."""
        self._require_schedule("index_for_timestep")
        vals = self._t_values(t)
        if len(vals) != 1:
            raise ValueError(f"expected one timestep, got {len(vals)}; step() takes the same t for the whole batch")
        return self._index_of(vals[0])

    def _counted_index(self, t) -> int:
        """diffusers' step counter: found from ``t`` on the first call after set_timesteps, then
        advanced by each ``step`` (for schedules with repeated timesteps and for stateful samplers)."""
        self._require_schedule("step")
        if self._step_index is None:
            vals = self._t_values(t)
            hits = (self._lookup == vals[0]).nonzero().flatten()
            if len(vals) != 1 or len(hits) == 0:
                self._index_of(vals[0])  # raises the lookup's error
            self._step_index = int(hits[0])
        return self._step_index

    def init_sigma(self) -> torch.Tensor:
        """``init_noise_sigma`` as a 0-d float32 CPU tensor: the same value, read by no one (the
        pipeline scales its starting noise with it, so no host read happens during a run)."""
        return torch.tensor(self.init_noise_sigma, dtype=torch.float32)

    def _index_of(self, v: float) -> int:
        hits = (self._lookup == v).nonzero().flatten()
        if len(hits) == 0:
            shown = self._lookup.tolist()
            shown = shown if len(shown) <= 12 else shown[:6] + ["…"] + shown[-6:]
            raise ValueError(
                f"timestep {v:g} is not in this scheduler's schedule (set_timesteps({self.num_inference_steps}) "
                f"gives {shown}); pass one of scheduler.timesteps")
        if len(hits) > 1:
            raise ValueError(f"timestep {v:g} occurs {len(hits)} times in the schedule; its step is ambiguous")
        return int(hits[0])

    # ------------------------------------------------------------ by step index (no timestep lookup)
    # ``step`` / ``add_noise`` find the step from the timestep's value, which reads t on the host
    # (a device sync when t lives on an accelerator). A caller that knows the step's position —
    # the pipeline — uses these instead: the same arithmetic, σ/ᾱ from the CPU tables as 0-d
    # tensors, no host read, no copy to the device.
    def step_at(self, model_output, step_index: int, sample, generator=None, noise=None) -> torch.Tensor:
        """``step`` at the schedule's ``step_index``-th timestep."""
        raise NotImplementedError

    def add_noise_at(self, original_samples: torch.Tensor, noise: torch.Tensor, step_index: int) -> torch.Tensor:
        """``add_noise`` at the schedule's ``step_index``-th timestep."""
        raise NotImplementedError

    # ------------------------------------------------------------ shared helpers
    @staticmethod
    def _per_sample(coef: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """[B] (or [1]) coefficients shaped to broadcast over ``like`` ([B, ...])."""
        if coef.numel() not in (1, like.shape[0]):
            raise ValueError(f"got {coef.numel()} timesteps for a batch of {like.shape[0]}; "
                             "pass one timestep, or one per sample")
        return coef.to(device=like.device, dtype=like.dtype).reshape(-1, *([1] * (like.ndim - 1)))

    @staticmethod
    def _scalar(coef: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """A 0-d CPU coefficient in ``like``'s dtype (a CPU scalar joins device tensors uncopied)."""
        return coef.to(dtype=like.dtype)

    @staticmethod
    def _draw_noise(model_output: torch.Tensor, generator) -> torch.Tensor:
        """randn of model_output's shape and dtype, drawn on the generator's device (CPU generator →
        drawn on the CPU, then moved), exactly as diffusers' ``randn_tensor`` does; a list of
        generators draws sample b of the batch from generator b."""
        shape, dtype, device = model_output.shape, model_output.dtype, model_output.device
        if isinstance(generator, (list, tuple)):
            if len(generator) != shape[0]:
                raise ValueError(f"{len(generator)} generators for a batch of {shape[0]}")
            z = [torch.randn((1, *shape[1:]), generator=g, device=g.device, dtype=dtype) for g in generator]
            return torch.cat([zi.to(device) for zi in z])
        dev = generator.device if generator is not None else device
        return torch.randn(shape, generator=generator, device=dev, dtype=dtype).to(device)

    @staticmethod
    def _check_noise(noise, generator, model_output):
        if noise is not None and generator is not None:
            raise ValueError("pass either noise= or generator=, not both")
        if noise is not None and noise.shape != model_output.shape:
            raise ValueError(f"noise has shape {tuple(noise.shape)}, model_output {tuple(model_output.shape)}")

    def __len__(self):
        return self.config["num_train_timesteps"]
