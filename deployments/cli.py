"""`flashtile` command line: generate in process, build the embedded default."""

import argparse
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
    }
    # 1. Validate before loading anything: bad input costs no model work.
    try:
        request = GenerateRequest(**{k: v for k, v in fields.items() if v is not None})
    except ValidationError as err:
        print(f"flashtile: invalid request: {error_text(err)}", file=sys.stderr)
        return 2

    from tqdm import tqdm

    from stages.pipeline import Flashtile
    from stages.png import encode_png

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
            unit = {"base": "step", "encode": "prompt"}.get(event.stage, "tile")
            bar = bars[event.stage] = tqdm(total=event.total, desc=f"{event.stage:>8}", unit=unit, disable=args.quiet)
        bar.total = event.total
        bar.n = event.step
        bar.refresh()

    result = flashtile(params, on_progress=progress)
    for bar in bars.values():
        bar.close()

    # 4. Write the PNG with its provenance in text chunks (no timings: same request -> same bytes).
    text = {
        "prompt": params.prompt,
        "negative_prompt": params.negative_prompt,
        "seed": params.seed,
        "size": params.size,
        "aspect_ratio": params.aspect_ratio,
        "mode": params.mode,
        "steps": ",".join(f"{k}={v}" for k, v in result.steps.items()),
        "guidance_scale": params.guidance_scale,
        "scheduler": params.scheduler,
        "model": result.model_id,
        "software": "Flashtile",
    }
    Path(args.output).write_bytes(encode_png(result.image, text))
    timings = " ".join(f"{k}={v:.2f}s" for k, v in result.timings.items())
    print(
        f"wrote {args.output}: {result.width}x{result.height} seed={params.seed} mode={params.mode} "
        f"steps={result.steps} load={loaded - started:.2f}s {timings} total={time.perf_counter() - started:.2f}s"
        + (" (prompt truncated at the encoder's token limit)" if result.prompt_truncated else "")
    )
    return 0


def _serve(args: argparse.Namespace) -> int:
    """Start a local Ray instance with its metrics on a fixed port, then `serve run` the config on it."""
    import ray
    from ray.serve.scripts import run

    from stages.models import cache_dir, ensure_default_model

    config = args.config
    if args.model is not None or args.output is not None:
        # Override the application's args; everything else stays the config's own.
        import yaml

        data = yaml.safe_load(Path(config).read_text())
        for app in data["applications"]:
            app.setdefault("args", {}).update(
                {k: v for k, v in (("model", args.model), ("output", args.output)) if v is not None}
            )
        config = cache_dir() / "serve-config.yaml"
        config.parent.mkdir(parents=True, exist_ok=True)
        config.write_text(yaml.safe_dump(data, sort_keys=False))
    if args.model is None:
        ensure_default_model()  # once, before five replicas would race to build it
    ray.init(namespace="serve", _metrics_export_port=args.metrics_port, include_dashboard=False)
    print(f"Flashtile: Prometheus metrics of the whole cluster at http://127.0.0.1:{args.metrics_port}/metrics")
    # serve run reuses the Ray instance started above; Ctrl-C shuts Serve down.
    return run.main([str(config)], standalone_mode=False) or 0


def _build_default(args: argparse.Namespace) -> int:
    from stages.models import ensure_default_model

    print(ensure_default_model())
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flashtile", description="Fast 4K image generation.")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate one image in this process (all four stages)")
    gen.add_argument("prompt")
    gen.add_argument("-o", "--output", default="out.png", help="PNG file to write")
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
    gen.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    gen.set_defaults(func=_generate)

    serve = sub.add_parser("serve", help="start the cluster locally: Ray Serve on cluster.yaml, metrics on a fixed port")
    serve.add_argument("config", nargs="?", default="cluster.yaml", help="Ray Serve config file")
    serve.add_argument("--metrics-port", type=int, default=8080, help="port of the cluster's Prometheus metrics")
    serve.add_argument("--model", help="override the config's model: a directory or s3://bucket/prefix")
    serve.add_argument("--output", help="override the config's output storage: a directory or s3://bucket/prefix")
    serve.set_defaults(func=_serve)

    build = sub.add_parser("build-default", help="build the embedded default model into the cache; print its path")
    build.set_defaults(func=_build_default)

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
