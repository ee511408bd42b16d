"""`flashtile` command line: generate in process, build the embedded default, train and evaluate it."""

import argparse
import copy
import os
import signal
import sys
import time
from pathlib import Path

from pydantic import ValidationError

from deployments.schemas import GenerateRequest, error_text
from stages.sizes import ASPECTS, MODES, SCHEDULERS, TIERS


def _generate(args: argparse.Namespace) -> int:
    fields = {
        "prompt": args.prompt,
        "negative_prompt": args.negative,
        "seed": args.seed,
        "size": args.size,
        "aspect_ratio": args.aspect,
        "mode": args.mode,
        "steps": args.steps,
        "guidance_scale": args.guidance,
        "scheduler": args.scheduler,
        # The file's suffix picks the format: .jpg/.jpeg, .webp, else PNG.
        "output_format": {".jpg": "jpeg", ".jpeg": "jpeg", ".webp": "webp"}.get(Path(args.output).suffix.lower(), "png"),
    }
    # 1. Validate before loading anything: bad input costs no model work.
    try:
        request = GenerateRequest(**{k: v for k, v in fields.items() if v is not None})
    except ValidationError as err:
        print(f"flashtile: invalid request: {error_text(err)}", file=sys.stderr)
        return 2

    from tqdm import tqdm

    import torch

    from stages.driver import FileSpec
    from stages.pipeline import Flashtile

    if args.threads is not None:
        torch.set_num_threads(args.threads)

    # 2. Load the model (the embedded default unless --model names a directory).
    started = time.perf_counter()
    try:
        from deployments.storage import StorageError, open_model

        flashtile = Flashtile.from_model(open_model(args.model), device=args.device)
        params = flashtile.params(**request.stage_fields())
    except (ValueError, StorageError) as err:
        print(f"flashtile: {err}", file=sys.stderr)
        return 2
    loaded = time.perf_counter()

    # 3. Run the four stages with one progress bar per stage.
    bars: dict[str, tqdm] = {}

    def progress(event) -> None:
        bar = bars.get(event.stage)
        if bar is None:
            for done in bars.values():  # stages run one after another: one live bar at a time
                done.close()
            unit = "step" if event.stage == "base" else "tile"
            bar = bars[event.stage] = tqdm(total=event.total, desc=f"{event.stage:>8}", unit=unit, disable=args.quiet)
        bar.total = event.total
        bar.n = event.step
        bar.refresh()

    # 4. The file carries its provenance (PNG text chunks, JPEG/WebP EXIF) and the watermark, whose request id is a
    #    hash of the resolved request and model: a rerun, here or on the cluster, writes the same bytes.
    result = flashtile.render(params, FileSpec(request.output_format, request.output_compression), on_progress=progress)
    for bar in bars.values():
        bar.close()
    Path(args.output).write_bytes(result.output)
    timings = " ".join(f"{k}={v:.2f}s" for k, v in result.timings.items())
    print(
        f"wrote {args.output}: {result.width}x{result.height} seed={params.seed} mode={params.mode} "
        f"request_id={result.request_id} "
        f"steps={result.steps} load={loaded - started:.2f}s {timings} total={time.perf_counter() - started:.2f}s"
        + (" (prompt truncated at the encoder's token limit)" if result.prompt_truncated else "")
    )
    return 0


def _serve(args: argparse.Namespace) -> int:
    """Start a local Ray instance with its metrics on a fixed port, then `serve run` the config on it."""
    import ray
    from ray.serve.scripts import run

    from stages.models import cache_dir, ensure_default_model

    import yaml

    config = args.config
    data = yaml.safe_load(Path(config).read_text())
    overrides = {k: v for k, v in (("model", args.model), ("output", args.output)) if v is not None}
    for item in args.arg:
        name, sep, value = item.partition("=")
        if not sep:
            print(f"flashtile: --arg takes NAME=VALUE; got {item!r}", file=sys.stderr)
            return 2
        overrides[name] = yaml.safe_load(value)  # YAML: numbers, lists and {a: 1} mappings as in cluster.yaml
    # Override the application's args; everything else stays the config's own.
    for app in data["applications"]:
        app.setdefault("args", {}).update(overrides)
    from pydantic import ValidationError as ArgsError

    from deployments.app import check_config
    from deployments.regions import place

    try:
        check_config(data)  # before anything starts: a bad config costs no Ray start-up
    except (ValueError, ArgsError) as err:
        print(f"flashtile: {config}: {err}", file=sys.stderr)
        return 2
    placed = place(copy.deepcopy(data))  # with regions: each deployment's label selector, router and floor
    if overrides or placed != data:
        config = cache_dir() / "serve-config.yaml"
        config.parent.mkdir(parents=True, exist_ok=True)
        config.write_text(yaml.safe_dump(placed, sort_keys=False))
    keys = os.environ.get("FLASHTILE_API_KEYS", "").strip() or any(a.get("args", {}).get("api_keys") for a in data["applications"])
    print("Flashtile: API keys configured; inference routes need 'Authorization: Bearer <key>'" if keys else
          "Flashtile: no API keys configured (FLASHTILE_API_KEYS): serving loopback clients (127.0.0.1, ::1) only")
    if args.model is None:
        ensure_default_model()  # once, before five replicas would race to build it
    # Ray's dashboard on loopback, so Ray's own tools work against this cluster: `serve status`, `serve deploy`.
    context = ray.init(namespace="serve", _metrics_export_port=args.metrics_port, include_dashboard=True,
                       dashboard_host="127.0.0.1")
    print(f"Flashtile: Prometheus metrics of the whole cluster at http://127.0.0.1:{args.metrics_port}/metrics; "
          f"Ray dashboard at http://{context.dashboard_url}")
    # SIGINT and SIGTERM to this process (not only Ctrl-C to its terminal's process group) stop it: serve run shuts
    # Serve down on KeyboardInterrupt, and the local Ray instance goes with this process. (A process started in the
    # background inherits SIGINT ignored; Ray's own SIGTERM handler would end it without shutting Serve down.)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        return run.main([str(config)], standalone_mode=False) or 0
    except SystemExit as stop:  # serve run exits after shutting Serve down
        return stop.code or 0
    finally:
        ray.shutdown()


def _build_default(args: argparse.Namespace) -> int:
    from stages.models import ensure_default_model

    print(ensure_default_model())
    return 0


def _train(args: argparse.Namespace) -> int:
    from dataclasses import fields

    from toyworld.config import Config
    from toyworld.train import train

    cfg = Config(**{f.name: getattr(args, f.name) for f in fields(Config) if getattr(args, f.name, None) is not None})
    train(Path(args.out), cfg)
    return 0


def _manifest(args: argparse.Namespace) -> int:
    from stages.models import ModelDir, write_manifest

    try:
        ModelDir(args.folder)  # a model folder (model_index.json, safetensors only) before anything is written
    except (ValueError, OSError) as err:
        print(f"flashtile: {err}", file=sys.stderr)
        return 2
    print(f"wrote {write_manifest(args.folder)}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from toyworld.evaluate import main as evaluate

    return evaluate(args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flashtile", description="Fast 4K image generation.")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate one image in this process (all four stages)")
    gen.add_argument("prompt")
    gen.add_argument("-o", "--output", default="out.png", help="file to write: PNG, or JPEG / WebP by its suffix")
    gen.add_argument("--size", choices=TIERS, default="1k")
    gen.add_argument("--aspect", choices=ASPECTS, default="1:1")
    gen.add_argument("--mode", choices=MODES)
    gen.add_argument("--seed", type=int)
    gen.add_argument("--steps", type=int)
    gen.add_argument("--guidance", type=float)
    gen.add_argument("--scheduler", choices=SCHEDULERS)
    gen.add_argument("--negative", default="")
    gen.add_argument("--model", help="diffusers-format model directory or s3://bucket/prefix (default: the embedded default)")
    gen.add_argument("--device", default="cpu")
    gen.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own). The same count as the "
                     "cluster's torch_threads gives the cluster's bytes exactly")
    gen.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    gen.set_defaults(func=_generate)

    serve = sub.add_parser("serve", help="start the cluster locally: Ray Serve on cluster.yaml, metrics on a fixed port")
    serve.add_argument("config", nargs="?", default="cluster.yaml", help="Ray Serve config file")
    serve.add_argument("--metrics-port", type=int, default=8080, help="port of the cluster's Prometheus metrics")
    serve.add_argument("--model", help="override the config's model: a directory or s3://bucket/prefix")
    serve.add_argument("--output", help="override the config's output storage: a directory or s3://bucket/prefix")
    serve.add_argument("--arg", action="append", default=[], metavar="NAME=VALUE",
                       help="override one application arg (YAML value), e.g. --arg max_in_flight=8 (repeatable)")
    serve.set_defaults(func=_serve)

    build = sub.add_parser("build-default", help="build the embedded default model into the cache; print its path")
    build.set_defaults(func=_build_default)

    manifest = sub.add_parser("manifest", help="write a model folder's sha256 manifest (flashtile.sha256), which every "
                              "replica checks the folder against before loading it")
    manifest.add_argument("folder", help="a diffusers-format model directory, as it is known to be good")
    manifest.set_defaults(func=_manifest)

    # The defaults are the shipped recipe; no abbreviations, so an option removed from it (`--unet-loss`) is refused
    # rather than read as one that starts the same (`--unet-loss-floor`).
    train = sub.add_parser(
        "train", help="train the embedded default's VAE, UNet, upscaler and fast UNet on the toy world (CPU)",
        description="With no options, the shipped recipe: the run that trained weights/flashtile-default-v1 "
        "(its MODEL_CARD.md).", allow_abbrev=False)
    train.add_argument("--out", default="weights/flashtile-default-v1", help="folder for the trained components")
    from toyworld.config import Config  # no torch import

    for name, default in Config().__dict__.items():
        train.add_argument(f"--{name.replace('_', '-')}", dest=name, type=type(default), help=f"default {default}")
    train.set_defaults(func=_train)

    ev = sub.add_parser("eval", help="prompt adherence of a model on held-aside toy-world captions, fast and quality")
    ev.add_argument("--model", help="model directory or `flashtile train` output folder (default: the embedded default)")
    ev.add_argument("-n", type=int, default=200, help="number of held-aside captions")
    ev.add_argument("--first", type=int, default=0, help="first held-aside caption: 0 the reported set, 200 the tuning set")
    ev.add_argument("--modes", default="quality,fast")
    ev.add_argument("--validate", type=int, default=1000, help="rendered ground-truth scenes to validate the checker on")
    ev.add_argument("--json", help="also write the results as JSON here")
    ev.add_argument("--grid", help="also write a PNG grid of the first prompts (quality mode) here")
    ev.set_defaults(func=_eval)

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
