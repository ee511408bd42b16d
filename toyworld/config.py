"""Training settings of `flashtile train` (no torch import: the CLI builds its options from these)."""

from dataclasses import dataclass

from stages.sizes import MAX_GUIDANCE


@dataclass
class Config:
    n_images: int = 10000  # training scenes (captions of the eval range are skipped)
    latent_channels: int = 8  # 3 pinned to the pooled colour, the rest free for shape
    vae_steps: int = 2500
    vae_batch: int = 16
    vae_crop: int = 64  # the autoencoder has no normalisation layers: crops train it for whole images
    vae_lr: float = 2e-3
    vae_pin: float = 1.0  # weight of the pooled-colour term on the first three latent channels
    latent_noise: float = 0.03  # noise added to latents before decoding in training
    unet_steps: int = 7000
    unet_batch: int = 32
    unet_lr: float = 8e-4
    unet_dtype: str = "auto"  # autocast dtype of the UNet's training forward: "auto" = bfloat16 on CPUs with native bf16 (AMX or AVX-512 BF16; ~25% faster there), else float32 (emulated bf16 ran 17x slower); "float32" = off
    unet_loss: str = "min-snr"  # "min-snr": v-MSE weighted min(snr, 5) / (snr + 1); "v": plain v-MSE, every timestep alike
    unet_loss_floor: float = 0.0  # min-SNR only: the least weight of a high-noise timestep (SNR < 5; 0 to 1); > 0 keeps teaching the high-noise steps, where only the caption says what goes where
    noise_shift: float = 1.0  # the cosine schedule's SNR divided by noise_shift**2 (1 to 8): > 1 spends more steps on the layout
    unet_object_weight: float = 0.0  # extra v-MSE weight on the latent pixels an object covers or touches (0 to 20): they weigh up to 1 + this (by how much of the cell is covered), the background 1; objects are ~3-25% of a scene, and their colour, shape and count are what is lost
    unet_object_min_snr: float = 0.1  # the object weight applies only at timesteps of at least this SNR (0 to 100), where the objects already show through the noise: below it the best guess under an object-weighted loss paints objects wherever one might be (measured: extra objects)
    unet_high_noise: float = 0.0  # share of each UNet batch drawn from t >= unet_high_noise_from instead of uniformly (0 to 1)
    unet_high_noise_from: int = 900  # 0 .. 999
    unet_multi_share: float = 0.0  # share of each UNet batch drawn from the count and relation scenes (0 to 1); 0: scenes drawn uniformly, so about half are (the data's own mix: 20% count, 30% relation)
    unet_channels: str = "32,64,128"  # channels per UNet level: 3 levels (32x32 to 8x8) or 4 (down to 4x4), multiples of 32
    unet_text: str = "tokens"  # "tokens": cross-attention to the token states; "tokens+pooled": also the pooled caption in the timestep embedding
    unet_input: str = "latents"  # "latents+coords": two more input channels that say where in the frame each pixel is
    unet_more_steps: int = 0  # > 0: a second, shorter UNet phase after the first (0 to 20000 steps), from its EMA weights, seed + 1
    unet_more_lr: float = 2e-4  # the second phase's AdamW learning rate (warm-up and cosine, like the first)
    unet_more_multi_share: float = 0.0  # the second phase's unet_multi_share (0 to 1): its batches' share of count and relation scenes
    unet_more_depth: int = 1  # transformer layers per cross-attention block in the second phase (1 or 2): 2 adds one, starting as the identity, at 16x16 (down and up), 8x8 down and the mid block
    unet_more_swap_weight: float = 0.0  # the second phase's colour-swap pair loss (0 to 10): 8 relation scenes a batch, each with its twin (the two colours exchanged) under the same noise and timestep, and each pair's difference of predictions fitted to its difference of targets with this weight; 0: off
    ema_decay: float = 0.995
    cfg_dropout: float = 0.1  # share of captions replaced by the empty prompt (the pipeline's negative)
    guidance_fast: float = 5.0  # request defaults written to the model's flashtile.json (0 to 30; 5 = the pipeline's own);
    guidance_quality: float = 5.0  # the shipped values come from a sweep on tuning captions, not the reported ones (README)
    ddim_eta_quality: float = 0.0  # quality mode's DDIM noise per step, written to flashtile.json (0 deterministic to 1, DDPM-like), drawn from the request's seed
    upscaler_steps: int = 600
    upscaler_batch: int = 16
    upscaler_scenes: int = 96
    seed: int = 0
    threads: int = 2
    unet_budget_min: float = 0.0  # > 0: stop the UNet early after this many minutes (the log records the steps run)
    vae_from: str = ""  # a folder of an earlier run: reuse its vae/ and upscaler/, train only the UNet (recipe experiments)
    unet_from: str = ""  # with vae_from: reuse that run's unet/ too (its log records how it was trained); only the fast UNet trains
    fast_distill_steps: int = 0  # > 0: distil a fast-mode UNet (fast/unet/) from the trained one in this many steps (0 to 20000); 0: fast mode runs the base UNet
    fast_distill_trajectories: int = 2560  # teacher samples (caption + noise) the fast UNet learns from (64 to 20000)
    fast_distill_substeps: int = 5  # teacher DDIM steps per fast-mode step (2 to 10): the teacher samples in 4 x this many
    fast_distill_guidance: float = 3.0  # the teacher's guidance (0 to 30), built into the fast UNet: the quality mode's
    fast_distill_lr: float = 1e-4  # AdamW learning rate of the fast UNet (cosine to 0), which starts as the trained UNet
    eval_every: int = 0  # > 0 (a multiple of 250, the checkpoint interval): every this many UNet steps, adherence of the EMA weights on eval_n captions, fast mode
    eval_n: int = 32

    def __post_init__(self):
        for name, allowed in (("unet_dtype", ("auto", "bfloat16", "float32")), ("unet_loss", ("min-snr", "v")),
                              ("unet_text", ("tokens", "tokens+pooled")),
                              ("unet_input", ("latents", "latents+coords"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {getattr(self, name)!r}")
        levels = self.unet_channels.split(",")
        if len(levels) not in (3, 4) or not all(c.strip().isdigit() and int(c) > 0 and int(c) % 32 == 0 for c in levels):
            raise ValueError("unet_channels must be 3 or 4 comma-separated positive multiples of 32 (channels per level, "
                             f"e.g. '32,64,128' or '32,64,128,128'); got {self.unet_channels!r}")
        if not 0.0 <= self.unet_high_noise <= 1.0:
            raise ValueError(f"unet_high_noise must be between 0 and 1 (a share of each batch); got {self.unet_high_noise}")
        for name in ("unet_multi_share", "unet_more_multi_share"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1 (a share of each batch); got {getattr(self, name)}")
        if not 0 <= self.unet_more_steps <= 20000:
            raise ValueError(f"unet_more_steps must be between 0 (no second phase) and 20000; got {self.unet_more_steps}")
        if self.unet_more_depth not in (1, 2):
            raise ValueError(f"unet_more_depth must be 1 (the UNet as the first phase built it) or 2; got {self.unet_more_depth}")
        if not 0.0 <= self.unet_more_swap_weight <= 10.0:
            raise ValueError(f"unet_more_swap_weight must be between 0 (off) and 10; got {self.unet_more_swap_weight}")
        if self.unet_more_swap_weight > 0 and self.unet_object_weight > 0:
            raise ValueError("unet_more_swap_weight and unet_object_weight cannot be combined; got "
                             f"{self.unet_more_swap_weight} and {self.unet_object_weight} (set one of them to 0)")
        if not 0.0 < self.unet_more_lr <= 0.01:
            raise ValueError(f"unet_more_lr must be above 0 and at most 0.01; got {self.unet_more_lr}")
        if not 0.0 <= self.unet_loss_floor <= 1.0:
            raise ValueError(f"unet_loss_floor must be between 0 (plain min-SNR) and 1 (a v-loss weight); got {self.unet_loss_floor}")
        if not 0.0 <= self.unet_object_weight <= 20.0:
            raise ValueError(f"unet_object_weight must be between 0 (every latent pixel alike) and 20; got {self.unet_object_weight}")
        if not 0.0 <= self.unet_object_min_snr <= 100.0:
            raise ValueError(f"unet_object_min_snr must be between 0 and 100 (a signal-to-noise ratio); got {self.unet_object_min_snr}")
        for name in ("guidance_fast", "guidance_quality", "fast_distill_guidance"):
            if not 0.0 <= getattr(self, name) <= MAX_GUIDANCE:
                raise ValueError(f"{name} must be between 0 and {MAX_GUIDANCE:g} (a classifier-free guidance scale); "
                                 f"got {getattr(self, name)}")
        if not 1.0 <= self.noise_shift <= 8.0:
            raise ValueError(f"noise_shift must be between 1 (the plain cosine schedule) and 8; got {self.noise_shift}")
        if not 0 <= self.unet_high_noise_from <= 999:
            raise ValueError(f"unet_high_noise_from must be a timestep between 0 and 999; got {self.unet_high_noise_from}")
        for name, lo, hi in (("fast_distill_steps", 0, 20000), ("fast_distill_trajectories", 64, 20000),
                             ("fast_distill_substeps", 2, 10)):
            if not lo <= getattr(self, name) <= hi:
                raise ValueError(f"{name} must be between {lo} and {hi}; got {getattr(self, name)}")
        if not 0.0 < self.fast_distill_lr <= 0.01:
            raise ValueError(f"fast_distill_lr must be above 0 and at most 0.01; got {self.fast_distill_lr}")
        if not 0.0 <= self.ddim_eta_quality <= 1.0:
            raise ValueError(f"ddim_eta_quality must be between 0 (deterministic DDIM) and 1; got {self.ddim_eta_quality}")
        if self.unet_from and not self.vae_from:
            raise ValueError("unet_from needs vae_from (the UNet was trained on that autoencoder's latents); "
                             f"got unet_from {self.unet_from!r} and no vae_from")
        if self.eval_every < 0 or self.eval_every % 250:
            raise ValueError(f"eval_every must be 0 (off) or a multiple of 250, the checkpoint interval; got {self.eval_every}")

    @property
    def unet_levels(self) -> tuple[int, ...]:
        """unet_channels as numbers: (32, 64, 128) for the default."""
        return tuple(int(c) for c in self.unet_channels.split(","))
