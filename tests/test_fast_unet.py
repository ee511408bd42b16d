"""The distilled fast UNet: how `flashtile train` distils it (toyworld/distill.py) and how fast mode runs it."""

import re
import shutil

import pytest
import torch

from tiny_models import save_tiny_sd

from stages.generate import BaseGenerator, make_scheduler
from stages.models import ModelDir
from toyworld.config import Config
from toyworld.distill import _ddim_step, distill_fast_unet, fast_timesteps, student_targets
from toyworld.train import make_unet, scheduler_config


def _abar(shift: float = 4.0) -> torch.Tensor:
    from diffusers import DDIMScheduler

    return DDIMScheduler(**scheduler_config(shift)).alphas_cumprod.double()  # [1000]


def test_fast_timesteps_are_the_pipelines_and_the_teachers_schedule_passes_through_each():
    from diffusers import DDIMScheduler

    sched = make_scheduler("ddim", dict(DDIMScheduler(**scheduler_config(4.0)).config))
    sched.set_timesteps(4)
    assert fast_timesteps(4) == sched.timesteps.tolist() == [999, 749, 499, 249]
    for sub in range(2, 11):  # every allowed --fast-distill-substeps
        assert fast_timesteps(4 * sub)[::sub] == fast_timesteps(4)


def test_one_student_step_on_its_target_lands_on_the_teachers_next_latents():
    from diffusers import DDIMScheduler

    abar = _abar()
    torch.manual_seed(0)
    states = torch.randn(3, 5, 8, 4, 4)  # [N, K + 1, C, h, w]: latents at 999, 749, 499, 249 and the end
    targets = student_targets(abar, states)  # [N, K, C, h, w]
    assert targets.shape == (3, 4, 8, 4, 4)
    # The pipeline's own sampler (4 DDIM steps, trailing) fed the targets retraces the teacher's latents.
    sched = make_scheduler("ddim", dict(DDIMScheduler(**scheduler_config(4.0)).config))
    sched.set_timesteps(4)
    for i, t in enumerate(sched.timesteps):
        landed = sched.step(targets[:, i], t, states[:, i]).prev_sample
        torch.testing.assert_close(landed, states[:, i + 1], rtol=1e-4, atol=1e-4)
        ours = _ddim_step(abar, states[:, i].double(), targets[:, i].double(), int(t), int(t) - 250)
        torch.testing.assert_close(ours.float(), states[:, i + 1], rtol=1e-4, atol=1e-4)
    # A wrong target lands elsewhere.
    assert not torch.allclose(sched.step(targets[:, 0] + 0.1, sched.timesteps[0], states[:, 0]).prev_sample, states[:, 1])


def test_distillation_trains_a_copy_of_the_unet_and_leaves_the_teacher_as_it_was():
    torch.manual_seed(0)
    teacher = make_unet(channels=(32, 32, 32)).eval().requires_grad_(False)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    cfg = Config(fast_distill_steps=3, fast_distill_trajectories=64, fast_distill_substeps=2, unet_batch=4,
                 noise_shift=4.0, unet_dtype="float32")
    embeds, empty = torch.randn(10, 77, 384), torch.zeros(1, 77, 384)
    logged = []
    student, losses = distill_fast_unet(cfg, teacher, embeds, empty, logged.append)

    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())  # the teacher is untouched
    changed = [k for k, v in student.state_dict().items() if not torch.equal(v, before[k])]
    assert changed and not any(p.requires_grad for p in student.parameters())
    assert any("teacher trajectories 64/64" in m for m in logged) and any("fast step 2/3" in m for m in logged)
    # The student reads coordinates like the teacher (the hook came along with the copy).
    assert getattr(student, "_flashtile_coordinates", False)


@pytest.mark.parametrize("field, bad, message", [
    ("fast_distill_steps", -1, "fast_distill_steps must be between 0 and 20000; got -1"),
    ("fast_distill_trajectories", 10, "fast_distill_trajectories must be between 64 and 20000; got 10"),
    ("fast_distill_substeps", 1, "fast_distill_substeps must be between 2 and 10; got 1"),
    ("fast_distill_guidance", 31.0, "fast_distill_guidance must be between 0 and 30"),
    ("fast_distill_lr", 0.0, "fast_distill_lr must be above 0 and at most 0.01; got 0.0"),
    ("unet_from", "weights/x", "unet_from needs vae_from"),
    ("unet_more_steps", -1, "unet_more_steps must be between 0 (no second phase) and 20000; got -1"),
    ("unet_more_lr", 0.0, "unet_more_lr must be above 0 and at most 0.01; got 0.0"),
    ("unet_more_multi_share", 1.5, "unet_more_multi_share must be between 0 and 1 (a share of each batch); got 1.5"),
])
def test_training_config_bounds_the_fast_unets_settings(field, bad, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        Config(**{field: bad})


@pytest.fixture(scope="module")
def tiny_with_fast(tmp_path_factory) -> ModelDir:
    """A tiny SD directory whose fast/unet/ is a UNet of the same layout with other (random) weights."""
    path = save_tiny_sd(tmp_path_factory.mktemp("tiny-fast"))
    unet = ModelDir(path).load("unet")
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    unet.save_pretrained(path / "fast" / "unet", safe_serialization=True)
    return ModelDir(path)


def test_fast_mode_runs_the_models_fast_unet_and_quality_mode_its_base_unet(tiny_with_fast):
    torch.set_num_threads(1)
    with_fast = BaseGenerator.from_pretrained(tiny_with_fast)
    assert with_fast.fast_unet is not None and with_fast.fast_unet is not with_fast.unet
    plain = BaseGenerator(with_fast.unet, with_fast.vae, with_fast.scheduler_config, "tiny")  # no fast UNet
    from stages.types import PromptEmbeds

    torch.manual_seed(0)
    embeds = PromptEmbeds("tiny", prompt_embeds=torch.randn(1, 77, 32), negative_embeds=torch.zeros(1, 77, 32))
    shared = dict(seed=5, width=64, height=64, steps=2, guidance_scale=1.0, scheduler="ddim")
    images = {(name, mode): g(embeds, mode=mode, **shared).image
              for name, g in (("fast", with_fast), ("plain", plain)) for mode in ("fast", "quality")}
    assert torch.equal(images["fast", "quality"], images["plain", "quality"])  # quality: the base UNet
    assert torch.equal(images["plain", "fast"], images["plain", "quality"])  # no fast UNet: fast runs the base one
    assert not torch.allclose(images["fast", "fast"], images["plain", "fast"], atol=1e-3)  # fast: its own UNet

    with pytest.raises(ValueError, match=re.escape("mode must be one of fast, quality; got 'turbo'")):
        with_fast(embeds, mode="turbo", **shared)


def test_an_optional_unet_role_must_be_known(tiny_with_fast, tmp_path):
    assert tiny_with_fast.load_optional_unet("refiner") is None  # absent: the caller falls back to the base UNet
    with pytest.raises(ValueError, match=re.escape("role must be one of refiner, fast; got 'upscaler'")):
        tiny_with_fast.load_optional_unet("upscaler")
    # A pickle in fast/ refuses the whole directory, like anywhere else in it.
    copy = tmp_path / "copy"
    shutil.copytree(tiny_with_fast.path, copy)
    (copy / "fast" / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ValueError, match="pickle"):
        ModelDir(copy)


def _card(tmp_path, log: dict, fast_unet: bool = False):
    """The model card of a copy of the shipped weights with `log` as its train_log.json: (text, command, table rows)."""
    import json

    from stages.models import DEFAULT_WEIGHTS
    from toyworld import card

    run = tmp_path / "run"
    shutil.copytree(DEFAULT_WEIGHTS, run, dirs_exist_ok=True)
    if fast_unet:
        shutil.copytree(run / "unet", run / "fast" / "unet", dirs_exist_ok=True)
    (run / "train_log.json").write_text(json.dumps(log))
    text = card.write(run).read_text()
    rows = {line.split(" (")[0].strip("| "): line for line in text.splitlines() if line.startswith("| ")}
    return text, text.split("```bash\n")[1].split("\n")[0], rows


def test_model_card_of_a_fast_unet_distilled_from_an_earlier_runs_unet(tmp_path):
    import json

    from stages.models import DEFAULT_WEIGHTS
    from toyworld.train import reused_record

    # A distillation-only run (--vae-from and --unet-from the shipped weights): it trained the fast UNet alone.
    earlier = json.loads((DEFAULT_WEIGHTS / "train_log.json").read_text())
    cfg = {**earlier["config"], "vae_from": "a", "unet_from": "b", "fast_distill_steps": 40, "fast_distill_substeps": 5,
           "fast_distill_trajectories": 256, "fast_distill_guidance": 3.0, "fast_distill_lr": 1e-4}
    log = {"config": cfg, "torch": "2.13.0+cpu", "reused": reused_record(DEFAULT_WEIGHTS),
           "reused_unet": {"from": "b", "torch": earlier["torch"], "wall_s": 3000.0, "losses": [0.02, 0.01] * 50},
           "wall_s": {"data": 10.0, "vae": 100.0, "unet": 1.0, "fast": 600.0, "total": 711.0},
           "losses": {"fast": [0.1, 0.05] * 20}}

    text, command, rows = _card(tmp_path, log, fast_unet=True)
    # The command reruns everything, and names only where the run differs from the defaults (the shipped recipe).
    assert command == "flashtile train --out weights/flashtile-default-v1 --fast-distill-steps 40 --fast-distill-trajectories 256"
    assert "The options are where this run differs from `flashtile train`'s defaults" in text
    assert "distilled with `--unet-from b`" in text
    assert rows["UNet"].endswith(f"| {3000.0 / 60:.1f} min |")  # the run that trained it
    assert rows["fast UNet"].endswith("| 40 | 32 | 10.0 min (teacher samples included) |")
    assert "fast UNet | the UNet distilled for fast mode" in text
    wall = log["reused"]["wall_s"]
    total = (711.0 - 100.0 + wall["vae"] + wall["upscaler"] - 1.0 + 3000.0) / 60
    assert f"**{total:.1f} min**" in text
    assert re.search(r"Final losses \(mean of the last 50 steps\): vae [\d.]+, unet 0\.0150, upscaler [\d.]+, fast 0\.0750\.", text)
    assert "`fast/unet/diffusion_pytorch_model.safetensors`" in text  # its checksum row


def test_unet_from_takes_the_earlier_runs_unet_recipe_and_keeps_this_runs_own_settings(tmp_path):
    import json

    from toyworld.train import unet_recipe

    earlier = tmp_path / "earlier"
    (earlier / "unet").mkdir(parents=True)
    (earlier / "train_log.json").write_text(json.dumps({"config": {
        "noise_shift": 3.0, "unet_steps": 7000, "unet_loss_floor": 0.0, "unet_input": "latents+coords",
        "guidance_fast": 1.5, "fast_distill_steps": 0, "vae_from": "older"}}))
    cfg = unet_recipe(Config(vae_from="v", unet_from=str(earlier), fast_distill_steps=10, guidance_fast=1.0))
    # The UNet's recipe (what its schedule and a rerun from scratch need) comes from the run that trained it ...
    assert (cfg.noise_shift, cfg.unet_steps, cfg.unet_loss_floor) == (3.0, 7000, 0.0)
    # ... this run's own choices stay, and a setting the config no longer has is left out.
    assert (cfg.fast_distill_steps, cfg.guidance_fast, cfg.vae_from, cfg.unet_from) == (10, 1.0, "v", str(earlier))
    assert unet_recipe(Config()) == Config()  # no --unet-from: unchanged
    with pytest.raises(ValueError, match="unet_from must be a training output folder with unet/ and train_log.json"):
        unet_recipe(Config(vae_from="v", unet_from=str(tmp_path / "missing")))


def test_a_second_unet_phase_is_this_runs_to_add_unless_the_reused_unet_had_one(tmp_path):
    import json

    from toyworld.train import unet_recipe

    earlier = tmp_path / "earlier"
    (earlier / "unet").mkdir(parents=True)
    log = {"config": {"noise_shift": 4.0, "unet_steps": 9000, "unet_more_steps": 0, "unet_more_multi_share": 0.0}}
    (earlier / "train_log.json").write_text(json.dumps(log))
    # A first-phase UNet: the second phase is this run's, by default the shipped one.
    cfg = unet_recipe(Config(vae_from="v", unet_from=str(earlier)))
    assert (cfg.unet_steps, cfg.unet_more_steps, cfg.unet_more_lr, cfg.unet_more_multi_share) == (9000, 4500, 4e-4, 0.75)
    cfg = unet_recipe(Config(vae_from="v", unet_from=str(earlier), unet_more_steps=1500, unet_more_multi_share=0.5))
    assert (cfg.unet_more_steps, cfg.unet_more_multi_share) == (1500, 0.5)
    # An earlier UNet that had its second phase: reused as it is, with that phase in the recipe; not a second one.
    log["config"].update(unet_more_steps=3000, unet_more_lr=2e-4, unet_more_multi_share=0.75)
    (earlier / "train_log.json").write_text(json.dumps(log))
    cfg = unet_recipe(Config(vae_from="v", unet_from=str(earlier)))
    assert (cfg.unet_more_steps, cfg.unet_more_lr, cfg.unet_more_multi_share) == (3000, 2e-4, 0.75)


def test_a_second_unet_phase_trains_from_the_given_unet_and_leaves_it_as_it_was():
    from toyworld.train import train_unet

    torch.manual_seed(0)
    first = make_unet(channels=(32, 32, 32)).eval().requires_grad_(False)
    before = {k: v.clone() for k, v in first.state_dict().items()}
    cfg = Config(unet_steps=2, unet_batch=2, unet_lr=1e-3, unet_dtype="float32", ema_decay=0.5)
    latents, embeds, empty = torch.randn(6, 8, 32, 32), torch.randn(6, 77, 384), torch.zeros(1, 77, 384)
    ema, losses = train_unet(cfg, latents, embeds, empty, lambda m: None, start=first, multi_share=0.75)
    assert len(losses) == 2
    assert all(torch.equal(v, before[k]) for k, v in first.state_dict().items())  # the first phase's UNet is untouched
    # The EMA starts at the given weights (not a fresh init) and has moved from them, but only a little.
    moved = [(ema.state_dict()[k] - v).abs().max().item() for k, v in before.items()]
    assert 0 < max(moved) < 0.01
    assert getattr(ema, "_flashtile_coordinates", False)


def test_model_card_of_a_run_that_added_a_second_unet_phase(tmp_path):
    import json

    from stages.models import DEFAULT_WEIGHTS
    from toyworld.train import reused_record

    earlier = json.loads((DEFAULT_WEIGHTS / "train_log.json").read_text())
    more = [0.004, 0.003] * 25
    cfg = {**earlier["config"], "vae_from": "a", "unet_from": "b", "unet_more_steps": 50, "unet_more_lr": 2e-4}
    log = {"config": cfg, "torch": "2.13.0+cpu", "reused": reused_record(DEFAULT_WEIGHTS),
           "reused_unet": {"from": "b", "torch": earlier["torch"], "wall_s": 3000.0, "losses": [0.02, 0.01] * 50},
           "unet_more": {"steps_run": 50, "wall_s": 240.0},  # its curve is in this run's losses
           "wall_s": {"data": 10.0, "vae": 100.0, "unet": 1.0, "fast": 600.0, "total": 951.0},
           "losses": {"unet_more": more, "fast": [0.1, 0.05] * 20}}

    text, command, rows = _card(tmp_path, log)
    assert "--unet-more-steps 50 --unet-more-lr 0.0002" in command
    assert "--unet-more-multi-share" not in command  # the default
    assert "75% of each batch from the count and relation scenes" in rows["UNet, second phase"]
    assert rows["UNet, second phase"].endswith("| 50 | 32 | 4.0 min |")
    wall = log["reused"]["wall_s"]
    total = (951.0 - 100.0 + wall["vae"] + wall["upscaler"] - 1.0 + 3000.0) / 60  # the phase is in this run's total
    assert f"**{total:.1f} min**" in text
    assert re.search(r"Final losses \(mean of the last 50 steps\): vae [\d.]+, unet 0\.0150, unet_more 0\.0035, upscaler", text)


def test_reusing_a_unet_carries_its_second_phase_and_that_phases_curve_once(tmp_path):
    import json

    from toyworld.train import _reuse_unet

    src, out = tmp_path / "src", tmp_path / "out"
    make_unet(channels=(32, 32, 32)).save_pretrained(src / "unet", safe_serialization=True)
    curve = [0.004, 0.003] * 10
    (src / "train_log.json").write_text(json.dumps({
        "torch": "2.13.0+cpu", "wall_s": {"unet": 9.0}, "unet_steps_run": 20,
        "unet_more": {"steps_run": 20, "wall_s": 3.0}, "losses": {"unet": [0.1] * 20, "unet_more": curve}}))
    record = {}
    _reuse_unet(src, out, record, lambda m: None)
    # The phase, the run that trained it and its curve (from that run's losses), carried across.
    assert record["unet_more"] == {"from": str(src), "torch": "2.13.0+cpu", "steps_run": 20, "wall_s": 3.0, "losses": curve}
    assert record["reused_unet"]["losses"] == [0.1] * 20 and record["unet_steps_run"] == 20
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()

    # A chain: reusing that copy finds the curve in its record of the phase.
    (out / "train_log.json").write_text(json.dumps({**record, "torch": "2.14.1+cu130", "wall_s": {"unet": 0.1}, "losses": {"fast": [0.1]}}))
    again = {}
    _reuse_unet(out, tmp_path / "again", again, lambda m: None)
    assert again["unet_more"] == record["unet_more"] and again["reused_unet"]["losses"] == [0.1] * 20  # (from: src)


def test_model_card_of_a_fast_unet_whose_unets_second_phase_ran_in_an_earlier_run(tmp_path):
    import json

    from stages.models import DEFAULT_WEIGHTS
    from toyworld.train import reused_record

    # Three runs: the UNet's first phase (b), its second phase (c, --unet-from b), the fast UNet (--unet-from c).
    earlier = json.loads((DEFAULT_WEIGHTS / "train_log.json").read_text())
    more = [0.004, 0.003] * 25
    cfg = {**earlier["config"], "vae_from": "c", "unet_from": "c", "unet_more_steps": 50, "unet_more_multi_share": 0.75}
    log = {"config": cfg, "torch": "2.13.0+cpu", "reused": reused_record(DEFAULT_WEIGHTS),
           "reused_unet": {"from": "b", "torch": "2.14.1+cu130", "wall_s": 3000.0, "losses": [0.02, 0.01] * 50},
           "unet_more": {"from": "c", "torch": "2.13.0+cpu", "steps_run": 50, "wall_s": 240.0, "losses": more},
           "wall_s": {"data": 10.0, "vae": 100.0, "unet": 1.0, "fast": 600.0, "total": 711.0},
           "losses": {"fast": [0.1, 0.05] * 20}}

    text, command, rows = _card(tmp_path, log)
    assert ("distilled with `--unet-from c`, whose UNet had its second phase (and that row below) from that run, under"
            " torch 2.13.0+cpu, and its first phase from `--unet-from b`, under torch 2.14.1+cu130") in text
    assert "--unet-more-steps 50" in command and "--unet-from" not in command
    assert rows["UNet, second phase"].endswith("| 50 | 32 | 4.0 min |")
    wall = log["reused"]["wall_s"]
    total = (711.0 - 100.0 + wall["vae"] + wall["upscaler"] - 1.0 + 3000.0 + 240.0) / 60  # the phase from its run
    assert f"**{total:.1f} min**" in text
    assert re.search(r"Final losses \(mean of the last 50 steps\): vae [\d.]+, unet 0\.0150, unet_more 0\.0035, upscaler", text)
