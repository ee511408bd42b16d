"""Base generator: seeded noise -> UNet denoising -> VAE decode, at the model's base resolution."""

from stages import _torchvision_compat  # noqa: F401  (first: see that module)
import math

import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

from stages.models import ModelDir
from stages.sizes import MODES, SCHEDULERS
from stages.types import BaseImage, PromptEmbeds, StepCallback, StepEvent

MAX_STEPS = 150
HYBRID_EULER_FRACTION = 0.3  # share of `hybrid` steps run by Euler: the early, composition-setting ones


# Linear maps from 4-channel SD / SDXL latents to RGB: a preview for the cost of one matmul, no VAE.
_LATENT_RGB = {
    "sd": [[0.3512, 0.2297, 0.3227], [0.3250, 0.4974, 0.2350], [-0.2829, 0.1762, 0.2721], [-0.2120, -0.2616, -0.7177]],
    "sdxl": [[0.3651, 0.4232, 0.4341], [-0.2533, -0.0042, 0.1068], [0.1076, 0.1111, -0.0362], [-0.3165, -0.2492, -0.2188]],
}


def latent_preview(latents: torch.Tensor, family: str = "sd") -> torch.Tensor:
    """[1, 4, h, w] latents -> [1, 3, h, w] RGB in [0, 1], at latent resolution (1/8 of the image)."""
    factors = torch.tensor(_LATENT_RGB[family], dtype=torch.float32)  # [4, 3]
    rgb = torch.einsum("bchw,cr->brhw", latents.float().cpu()[:, :4], factors)
    return ((rgb + 1) / 2).clamp(0, 1)


def make_scheduler(name: str, config: dict):
    """A fresh scheduler per request (scheduler state is per run): Euler, DPM++ 2M Karras or DDIM."""
    if name == "euler":
        return EulerDiscreteScheduler.from_config(config, timestep_spacing="trailing")
    if name == "euler_karras":
        return EulerDiscreteScheduler.from_config(config, use_karras_sigmas=True)
    if name == "dpmpp_2m_karras":
        return DPMSolverMultistepScheduler.from_config(
            config, algorithm_type="dpmsolver++", solver_order=2, use_karras_sigmas=True
        )
    if name == "ddim":
        return DDIMScheduler.from_config(config, timestep_spacing="trailing", clip_sample=False)
    raise ValueError(f"scheduler must be one of {', '.join(SCHEDULERS)}; got {name!r}")


_NATIVE_SCHEDULERS = {"DDIMScheduler": "ddim", "EulerDiscreteScheduler": "euler", "DPMSolverMultistepScheduler": "dpmpp_2m_karras"}


def preferred_scheduler(config: dict) -> str:
    """The request default for a model: its checkpoint's own sampler where Flashtile has it, else `hybrid`."""
    return _NATIVE_SCHEDULERS.get(config.get("_class_name", ""), "hybrid")


class BaseGenerator:
    """Text-to-image at base resolution, for SD-family and SDXL UNets.

    `fast` and `quality` renders of a seed start from the same initial noise, so they share a composition.
    A model may ship a `fast_unet` distilled from its UNet for fast mode (few steps, guidance built in); fast
    requests then run it, and it was trained to land where the UNet's many guided steps land from that noise.
    """

    def __init__(
        self, unet, vae, scheduler_config: dict, model_id: str, family: str = "sd", vae_tiling: bool = True,
        default_guidance: dict[str, float] | None = None, fast_unet=None, ddim_eta: dict[str, float] | None = None,
    ):
        self.unet = unet
        self.fast_unet = fast_unet
        self.vae = vae
        self.scheduler_config = scheduler_config
        self.model_id = model_id
        self.family = family
        self.default_guidance = dict(default_guidance or {})  # mode -> scale tuned for this model (flashtile.json)
        self.ddim_eta = dict(ddim_eta or {})  # mode -> the DDIM sampler's fresh noise per step (flashtile.json; else 0)
        if vae_tiling:
            vae.enable_tiling()  # tiles only decodes larger than the VAE's own tile size

    @classmethod
    def from_pretrained(cls, model: ModelDir, device="cpu", dtype=torch.float32, **kwargs) -> "BaseGenerator":
        unet, vae = model.load("unet", dtype).to(device), model.load("vae", dtype).to(device)
        fast = model.load_optional_unet("fast", dtype)
        return cls(unet, vae, model.scheduler_config(), model.model_id, model.family,
                   default_guidance=model.default_guidance, fast_unet=None if fast is None else fast.to(device),
                   ddim_eta=model.ddim_eta, **kwargs)

    @property
    def default_scheduler(self) -> str:
        return preferred_scheduler(self.scheduler_config)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def base_resolution(self) -> int:
        """The side the model was trained at: UNet sample size x VAE factor (1024 for SDXL, 512 for SD 1.5)."""
        return self.unet.config.sample_size * self.vae_scale_factor

    @property
    def size_multiple(self) -> int:
        """Pixel sides must divide by this: the VAE factor times the UNet's downsampling."""
        return self.vae_scale_factor * 2 ** (len(self.unet.config.block_out_channels) - 1)

    def initial_noise(self, seed: int, width: int, height: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Unit Gaussian latents from a CPU generator: the same on every device for a seed. A `generator` seeded
        with the seed goes on to draw that request's sampler noise (DDIM with eta > 0)."""
        generator = generator or torch.Generator("cpu").manual_seed(seed)
        shape = (1, self.unet.config.out_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        return torch.randn(shape, generator=generator, dtype=torch.float32)  # [1, C, h/8, w/8]

    def check_inputs(self, seed: int, width: int, height: int, steps: int, guidance_scale: float, scheduler: str,
                     mode: str = "quality"):
        m = self.size_multiple
        if width <= 0 or height <= 0 or width % m or height % m:
            raise ValueError(f"width and height must be positive multiples of {m}; got {width}x{height}")
        if not 1 <= steps <= MAX_STEPS:
            raise ValueError(f"steps must be between 1 and {MAX_STEPS}; got {steps}")
        if not math.isfinite(guidance_scale) or guidance_scale < 0:
            raise ValueError(f"guidance_scale must be a finite number >= 0; got {guidance_scale}")
        if scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler must be one of {', '.join(SCHEDULERS)}; got {scheduler!r}")
        if not 0 <= seed < 2**63:
            raise ValueError(f"seed must be between 0 and 2**63-1; got {seed}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}; got {mode!r}")

    def __call__(self, embeds: PromptEmbeds, *, seed: int, on_step: StepCallback | None = None, **shared) -> BaseImage:
        """One image: `shared` = width, height, steps, guidance_scale, scheduler, mode (see generate_batch)."""
        return self.generate_batch([embeds], [seed], on_step=on_step, **shared)[0]

    @torch.inference_mode()
    def generate_batch(
        self,
        embeds: list[PromptEmbeds],
        seeds: list[int],
        *,
        width: int,
        height: int,
        steps: int,
        guidance_scale: float,
        scheduler: str = "hybrid",
        mode: str = "quality",
        on_step: StepCallback | None = None,
    ) -> list[BaseImage]:
        """Several requests that share size, steps, guidance, scheduler and mode, denoised as one batch.

        Each keeps its own prompt and seed (its own initial noise). Batched float math may differ from a
        single run in the last bits; the composition is the same.
        """
        # 0. Refuse bad input before any model work.
        if len(embeds) != len(seeds) or not seeds:
            raise ValueError(f"generate_batch needs one seed per prompt; got {len(embeds)} prompts, {len(seeds)} seeds")
        for seed in seeds:
            self.check_inputs(seed, width, height, steps, guidance_scale, scheduler, mode)
        # Fast mode runs the distilled UNet where the model ships one (it expects the same latents and context).
        unet = self.fast_unet if mode == "fast" and self.fast_unet is not None else self.unet
        device, dtype = unet.device, unet.dtype

        # 1. Conditioning. Classifier-free guidance runs the unconditional branch in the same batch.
        cfg = guidance_scale > 1.0
        context = torch.cat([e.prompt_embeds for e in embeds])  # [B, T, D]
        if cfg:
            context = torch.cat([torch.cat([e.negative_embeds for e in embeds]), context])  # [2B, T, D]
        context = context.to(device, dtype)
        added = None
        if self.family == "sdxl":
            pooled = torch.cat([e.pooled for e in embeds])  # [B, P]
            if cfg:
                pooled = torch.cat([torch.cat([e.negative_pooled for e in embeds]), pooled])  # [2B, P]
            # SDXL micro-conditioning: original size, crop top-left, target size.
            time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=dtype).repeat(pooled.shape[0], 1)
            added = {"text_embeds": pooled.to(device, dtype), "time_ids": time_ids.to(device)}

        # 2. Schedules. `hybrid` runs Euler for the first steps (they set the composition) and DPM++ 2M Karras
        #    for the rest; both use the same Karras sigmas, so the hand-over is one change of variables.
        if scheduler == "hybrid":
            first = make_scheduler("euler_karras", self.scheduler_config)
            second = make_scheduler("dpmpp_2m_karras", self.scheduler_config)
            switch = max(1, round(steps * HYBRID_EULER_FRACTION)) if steps > 1 else steps
            second.set_timesteps(steps, device=device)
            second.set_begin_index(switch)
        else:
            first, second, switch = make_scheduler(scheduler, self.scheduler_config), None, steps
        first.set_timesteps(steps, device=device)
        # Start at step 0 explicitly: schedules that repeat a timestep would otherwise begin at its second copy.
        if hasattr(first, "set_begin_index"):  # DDIM keeps no step index
            first.set_begin_index(0)

        # 3. Seeded initial noise per request, scaled to the first scheduler's starting sigma. Each request's
        #    generator then draws its own DDIM step noise (where the mode has eta > 0): batch-independent.
        generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
        noise = torch.cat([self.initial_noise(s, width, height, g) for s, g in zip(seeds, generators)])  # [B, C, h/8, w/8]
        latents = noise.to(device, dtype) * first.init_noise_sigma
        eta = self.ddim_eta.get(mode, 0.0) if scheduler == "ddim" else 0.0

        # 4. Denoise. The callback reports progress and may raise Cancelled to stop within one step.
        total = len(first.timesteps)
        for i in range(total):
            sched = first if i < switch else second
            t = sched.timesteps[i]
            if i == switch:
                # Euler's latents live in sigma space (x0 + sigma * eps); DPM++'s in VP space
                # (alpha * x0 + sigma_vp * eps) with alpha = 1 / sqrt(sigma^2 + 1).
                latents = latents / (first.sigmas[i] ** 2 + 1) ** 0.5
            model_in = torch.cat([latents] * 2) if cfg else latents
            model_in = sched.scale_model_input(model_in, t)
            noise_pred = unet(model_in, t, encoder_hidden_states=context, added_cond_kwargs=added).sample
            if cfg:
                uncond, cond = noise_pred.chunk(2)
                noise_pred = uncond + guidance_scale * (cond - uncond)
            if eta > 0:
                fresh = torch.cat([torch.randn(noise.shape[1:], generator=g)[None] for g in generators])
                out = sched.step(noise_pred, t, latents, eta=eta, variance_noise=fresh.to(device, dtype))
            else:
                out = sched.step(noise_pred, t, latents)
            latents = out.prev_sample
            if on_step is not None:
                denoised = getattr(out, "pred_original_sample", None)
                on_step(StepEvent("base", i + 1, total, latents, latents if denoised is None else denoised))

        # 5. Decode with the VAE (tiled when large) to images in [0, 1].
        images = self.decode(latents)  # [B, 3, H, W]
        return [BaseImage(image=images[i : i + 1].clone(), seed=seed, steps=total) for i, seed in enumerate(seeds)]

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        cfg = self.vae.config
        latents = latents / cfg.scaling_factor + (getattr(cfg, "shift_factor", None) or 0.0)
        image = self.vae.decode(latents.to(self.vae.dtype)).sample
        return (image / 2 + 0.5).clamp(0, 1).float().cpu()
