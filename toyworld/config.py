"""Training settings of `flashtile train` (no torch import: the CLI builds its options from these)."""

from dataclasses import dataclass

from stages.sizes import MAX_GUIDANCE


@dataclass
class Config:
    """The shipped recipe: `flashtile train` with no options but --out trains weights/flashtile-default-v1.

    The defaults are the settings the shipped weights were trained with (their train_log.json), so the model card's
    command lists only where a run differs from them. Levers that were tried and not adopted have no setting here;
    what each scored is in toyworld/EXPERIMENTS.md.
    """

    n_images: int = 10000  # training scenes (captions of the eval range are skipped)
    latent_channels: int = 8  # 3 pinned to the pooled colour, the rest free for shape
    vae_steps: int = 2500
    vae_batch: int = 16
    vae_crop: int = 64  # the autoencoder has no normalisation layers: crops train it for whole images
    vae_lr: float = 2e-3
    vae_pin: float = 1.0  # weight of the pooled-colour term on the first three latent channels
    latent_noise: float = 0.03  # noise added to latents before decoding in training
    unet_steps: int = 9000
    unet_batch: int = 32
    unet_lr: float = 8e-4
    unet_dtype: str = "auto"  # autocast dtype of the UNet's training forward: "auto" = bfloat16 on CPUs with native bf16 (AMX or AVX-512 BF16; ~25% faster there), else float32 (emulated bf16 ran 17x slower); "float32" = off
    unet_loss_floor: float = 0.03  # the least min-SNR weight of a high-noise timestep (SNR < 5; 0 to 1): keeps teaching the high-noise steps, where only the caption says what goes where (0.02 and 0.05 scored lower)
    noise_shift: float = 4.0  # the cosine schedule's SNR divided by noise_shift**2 (1 to 8): > 1 spends more steps on the layout
    unet_more_steps: int = 4500  # a second, shorter UNet phase after the first (0 to 20000 steps; 0: none), from its EMA weights, seed + 1
    unet_more_lr: float = 4e-4  # the second phase's AdamW learning rate (warm-up and cosine, like the first)
    unet_more_multi_share: float = 0.75  # share of each second-phase batch drawn from the count and relation scenes (0 to 1; 0: drawn uniformly, about half)
    ema_decay: float = 0.995
    cfg_dropout: float = 0.1  # share of captions replaced by the empty prompt (the pipeline's negative)
    guidance_fast: float = 1.0  # request defaults written to the model's flashtile.json (0 to 30): 1 for the fast UNet,
    guidance_quality: float = 3.0  # which has the guidance built in; swept on tuning captions, not the reported ones
    upscaler_steps: int = 600
    upscaler_batch: int = 16
    upscaler_scenes: int = 96
    seed: int = 0
    threads: int = 2
    vae_from: str = ""  # a folder of an earlier run: reuse its vae/ and upscaler/, train only the UNet (the shipped run went a phase a run)
    unet_from: str = ""  # with vae_from: reuse that run's unet/ too (its log records how it was trained); only the phases it lacks train
    fast_distill_steps: int = 2000  # > 0: distil a fast-mode UNet (fast/unet/) from the trained one in this many steps (0 to 20000); 0: fast mode runs the base UNet
    fast_distill_trajectories: int = 2560  # teacher samples (caption + noise) the fast UNet learns from (64 to 20000)
    fast_distill_substeps: int = 5  # teacher DDIM steps per fast-mode step (2 to 10): the teacher samples in 4 x this many
    fast_distill_guidance: float = 3.0  # the teacher's guidance (0 to 30), built into the fast UNet: the quality mode's
    fast_distill_lr: float = 1e-4  # AdamW learning rate of the fast UNet (cosine to 0), which starts as the trained UNet
    eval_every: int = 0  # > 0 (a multiple of 250, the checkpoint interval): every this many UNet steps, adherence of the EMA weights on eval_n captions, fast mode
    eval_n: int = 32

    def __post_init__(self):
        if self.unet_dtype not in (allowed := ("auto", "bfloat16", "float32")):
            raise ValueError(f"unet_dtype must be one of {', '.join(map(repr, allowed))}; got {self.unet_dtype!r}")
        if not 0.0 <= self.unet_more_multi_share <= 1.0:
            raise ValueError(f"unet_more_multi_share must be between 0 and 1 (a share of each batch); got {self.unet_more_multi_share}")
        if not 0 <= self.unet_more_steps <= 20000:
            raise ValueError(f"unet_more_steps must be between 0 (no second phase) and 20000; got {self.unet_more_steps}")
        if not 0.0 < self.unet_more_lr <= 0.01:
            raise ValueError(f"unet_more_lr must be above 0 and at most 0.01; got {self.unet_more_lr}")
        if not 0.0 <= self.unet_loss_floor <= 1.0:
            raise ValueError(f"unet_loss_floor must be between 0 (plain min-SNR) and 1 (a v-loss weight); got {self.unet_loss_floor}")
        for name in ("guidance_fast", "guidance_quality", "fast_distill_guidance"):
            if not 0.0 <= getattr(self, name) <= MAX_GUIDANCE:
                raise ValueError(f"{name} must be between 0 and {MAX_GUIDANCE:g} (a classifier-free guidance scale); "
                                 f"got {getattr(self, name)}")
        if not 1.0 <= self.noise_shift <= 8.0:
            raise ValueError(f"noise_shift must be between 1 (the plain cosine schedule) and 8; got {self.noise_shift}")
        for name, lo, hi in (("fast_distill_steps", 0, 20000), ("fast_distill_trajectories", 64, 20000),
                             ("fast_distill_substeps", 2, 10)):
            if not lo <= getattr(self, name) <= hi:
                raise ValueError(f"{name} must be between {lo} and {hi}; got {getattr(self, name)}")
        if not 0.0 < self.fast_distill_lr <= 0.01:
            raise ValueError(f"fast_distill_lr must be above 0 and at most 0.01; got {self.fast_distill_lr}")
        if self.unet_from and not self.vae_from:
            raise ValueError("unet_from needs vae_from (the UNet was trained on that autoencoder's latents); "
                             f"got unet_from {self.unet_from!r} and no vae_from")
        if self.eval_every < 0 or self.eval_every % 250:
            raise ValueError(f"eval_every must be 0 (off) or a multiple of 250, the checkpoint interval; got {self.eval_every}")
