"""Fast mode, distilled: a UNet that takes in one DDIM step what the base UNet's guided sampler takes in several.

Guided distillation in one stage (after Meng et al., "On distillation of guided diffusion models"): the teacher is
the trained UNet under classifier-free guidance, sampled by deterministic DDIM with `fast_distill_substeps` steps
for every fast-mode step; the student starts as a copy of it and learns, without guidance, the one DDIM step from
each fast-mode timestep that lands where the teacher's sub-steps land. Both start from the same noise, so a fast
render keeps the composition of the quality render of its seed, and runs one UNet pass a step instead of two.

    1. teacher trajectories: caption + noise -> the teacher's latents at the fast-mode timesteps (999, 749, 499, 249, 0)
    2. targets: the v that makes one DDIM step of the student land on the teacher's next latents
    3. train the student on (latents, timestep, caption) -> that v; EMA weights
"""

import copy
import math
import time

import numpy as np
import torch

from toyworld.config import Config
from toyworld.train import ema_step, scheduler_config, unet_autocast

FAST_STEPS = 4  # the fast mode's default step count (stages.pipeline.DEFAULT_STEPS["fast"])


def fast_timesteps(steps: int = FAST_STEPS, train_steps: int = 1000) -> list[int]:
    """The timesteps DDIM with trailing spacing visits in `steps` steps: [999, 749, 499, 249] for 4."""
    return (np.round(np.arange(train_steps, 0, -train_steps / steps)).astype(np.int64) - 1).tolist()


def _scales(abar: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(signal, noise) scales of timestep t: sqrt(abar), sqrt(1 - abar); t < 0 is the clean image (1, 0)."""
    a = abar[t].sqrt() if t >= 0 else torch.ones((), dtype=abar.dtype)
    return a, (1 - a**2).sqrt()


def _ddim_step(abar: torch.Tensor, x: torch.Tensor, v: torch.Tensor, t: int, s: int) -> torch.Tensor:
    """Deterministic DDIM from timestep t to s (s < 0: to the clean image) for a v-prediction."""
    (a_t, s_t), (a_s, s_s) = _scales(abar, t), _scales(abar, s)
    x0, eps = a_t * x - s_t * v, s_t * x + a_t * v
    return a_s * x0 + s_s * eps


def teacher_trajectories(cfg: Config, unet, abar: torch.Tensor, embeds: torch.Tensor, empty: torch.Tensor, log):
    """[N, K + 1, C, h, w] latents at the K fast-mode timesteps and at the end, and [N] caption indices.

    The teacher runs DDIM over the trailing schedule of K x substeps steps, which passes through every fast-mode
    timestep, in float64 between its (float32) UNet passes, under the quality mode's guidance. Float32, so the
    model card's command reproduces the shipped fast UNet. bfloat16 would halve the sampling time (10.0 s against
    21.6 s for 64 samples) and move the final latents by 0.8% of their RMS; the one fast UNet distilled from
    bfloat16 samples (5,120 of them) scored 80.8% on the tuning captions, within the spread of float32 runs
    (80.4% to 82.5%; the shipped one 81.3%).
    """
    k, sub = FAST_STEPS, cfg.fast_distill_substeps
    ts = fast_timesteps(k * sub) + [-1]
    assert ts[::sub][:k] == fast_timesteps(k)
    g = torch.Generator().manual_seed(cfg.seed + 5)
    n = cfg.fast_distill_trajectories
    idx = torch.randint(0, len(embeds), (n,), generator=g)
    c, side = unet.config.out_channels, unet.config.sample_size
    states = torch.empty(n, k + 1, c, side, side)
    started, batch = time.perf_counter(), 64
    for b in range(0, n, batch):
        ids = idx[b : b + batch]
        context = torch.cat([empty.expand(len(ids), -1, -1), embeds[ids]])  # [2B, T, D]: unconditional, caption
        x = torch.randn((len(ids), c, side, side), generator=g).double()  # [B, C, h, w]
        states[b : b + len(ids), 0] = x.float()
        with torch.inference_mode():
            for j, (t, s) in enumerate(zip(ts[:-1], ts[1:])):
                uncond, cond = unet(torch.cat([x, x]).float(), t, encoder_hidden_states=context).sample.double().chunk(2)
                x = _ddim_step(abar, x, uncond + cfg.fast_distill_guidance * (cond - uncond), t, s)
                if (j + 1) % sub == 0:
                    states[b : b + len(ids), (j + 1) // sub] = x.float()
        if (b // batch) % 10 == 0:
            log(f"fast: teacher trajectories {b + len(ids)}/{n} ({time.perf_counter() - started:.0f}s)")
    return states, idx


def student_targets(abar: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
    """[N, K, C, h, w] v targets: one DDIM step from states[:, i] at fast timestep i lands on states[:, i + 1].

    With x_s = a_s x0 + s_s (x_t - a_t x0) / s_t solved for x0, then v = (a_t x_t - x0) / s_t.
    """
    ts = fast_timesteps(states.shape[1] - 1)
    out = torch.empty(states.shape[0], len(ts), *states.shape[2:])
    for i, t in enumerate(ts):
        s = ts[i + 1] if i + 1 < len(ts) else -1
        (a_t, s_t), (a_s, s_s) = _scales(abar, t), _scales(abar, s)
        x_t, x_s = states[:, i].double(), states[:, i + 1].double()
        x0 = (x_s - (s_s / s_t) * x_t) / (a_s - s_s * a_t / s_t)
        out[:, i] = ((a_t * x_t - x0) / s_t).float()
    return out


def distill_fast_unet(cfg: Config, unet, embeds: torch.Tensor, empty: torch.Tensor, log):
    """The student (EMA weights) and its losses, from the trained `unet` (the teacher, left unchanged)."""
    from diffusers import DDIMScheduler

    abar = DDIMScheduler(**scheduler_config(cfg.noise_shift)).alphas_cumprod.double()  # [1000]
    teacher = unet.eval().requires_grad_(False)

    # 1. What the guided sampler does from a few thousand noises and training captions.
    states, idx = teacher_trajectories(cfg, teacher, abar, embeds, empty, log)

    # 2. What one student step must do instead.
    targets = student_targets(abar, states)  # [N, K, C, h, w]
    timesteps = torch.tensor(fast_timesteps())

    # 3. Regress the student's v on those targets, every fast timestep alike, no caption dropout (it runs unguided).
    student = copy.deepcopy(teacher).train().requires_grad_(True)
    ema = copy.deepcopy(teacher)
    opt = torch.optim.AdamW(student.parameters(), lr=cfg.fast_distill_lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(cfg.seed + 6)
    losses, steps = [], cfg.fast_distill_steps
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = cfg.fast_distill_lr * min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * step / steps))
        n = torch.randint(0, len(states), (cfg.unet_batch,), generator=g)
        i = torch.randint(0, len(timesteps), (cfg.unet_batch,), generator=g)
        with unet_autocast(cfg):
            pred = student(states[n, i], timesteps[i], encoder_hidden_states=embeds[idx[n]]).sample.float()
        loss = ((pred - targets[n, i]) ** 2).mean()
        losses.append(ema_step(opt, student, ema, loss, step, cfg.ema_decay))
        if step % 25 == 0 or step == steps - 1:
            log(f"fast step {step}/{steps} loss {np.mean(losses[-25:]):.4f}")
    return ema.eval().requires_grad_(False), losses
