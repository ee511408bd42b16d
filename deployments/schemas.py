"""Request and result models of Flashtile's API (pydantic v2). No torch here: clients can import this alone.

Field names are the HTTP API's, as they are. Numbers are strict: `true`, `"5"` or `5.0` for an integer (and a
boolean for a number) are refused, not coerced. Stage parameters (stages.pipeline.GenerationParams) are a
separate, fully resolved form of the same request.
"""

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from stages.sizes import ASPECTS, MAX_GUIDANCE, TIERS, Aspect, Mode, OutputFormat, SchedulerName, Tier, output_size

MAX_PROMPT_CHARS = 2000
MAX_STEPS = 150
MAX_SEED = 2**63 - 1
MAX_TIMEOUT_S = 3600.0
DELIVERY_FIELDS = {"response_format", "timeout_s", "output_format", "output_compression"}  # how the answer is delivered, not what is drawn
MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


class GenerateRequest(BaseModel):
    """One image to generate."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=False)

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS, description="What to draw (1-2000 characters).")
    negative_prompt: str = Field(default="", max_length=MAX_PROMPT_CHARS, description="What to steer away from.")
    seed: int | None = Field(
        default=None, ge=0, le=MAX_SEED, strict=True, description="Seed of the initial noise; drawn and reported when absent."
    )
    size: Tier = Field(default="1k", description="Output tier: preview (base only, fast), 1k, 2k or 4k (long side).")
    aspect_ratio: Aspect = Field(default="1:1", description="Aspect ratio of the output.")
    mode: Mode | None = Field(
        default=None, description="fast (few steps) or quality; default: fast for preview, quality otherwise."
    )
    steps: int | None = Field(default=None, ge=1, le=MAX_STEPS, strict=True, description="Base denoising steps (default by mode).")
    guidance_scale: float | None = Field(
        default=None, ge=0.0, le=MAX_GUIDANCE, allow_inf_nan=False, strict=True,
        description="Classifier-free guidance scale; default: the model's for the mode (GET /v1/models).",
    )
    scheduler: SchedulerName | None = Field(
        default=None, description="Sampler; default: the model's own (hybrid = Euler early, DPM++ 2M Karras after)."
    )
    response_format: Literal["b64_json", "url"] = Field(
        default="b64_json", description="b64_json: the image in the answer; url: a link to the stored image."
    )
    output_format: OutputFormat = Field(default="png", description="png (lossless, the default), jpeg or webp.")
    output_compression: int | None = Field(
        default=None, ge=0, le=100, strict=True, description="Quality of jpeg and webp, 0-100 (default 100); not for png."
    )
    timeout_s: float | None = Field(
        default=None, gt=0, le=MAX_TIMEOUT_S, allow_inf_nan=False, strict=True,
        description="Give up (408) after this many seconds; the server's request_timeout_s caps it.",
    )

    def stage_fields(self) -> dict:
        """The fields the stages run on (what resolve_params takes): not how the answer is delivered."""
        return self.model_dump(exclude_none=True, exclude=DELIVERY_FIELDS)

    @field_validator("prompt")
    @classmethod
    def _prompt_not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("prompt must contain a non-whitespace character")
        return value

    @field_validator("output_compression")
    @classmethod
    def _compression_fits_format(cls, value, info):
        return _check_compression(value, info.data.get("output_format"))

    @field_validator("mode")
    @classmethod
    def _mode_fits_size(cls, value, info):
        if value == "quality" and info.data.get("size") == "preview":
            raise ValueError("mode must be 'fast' for size 'preview' (a preview is the fast base render)")
        return value


def describe_errors(errors: ValidationError | list[dict], model: type[BaseModel] | None = None) -> list[dict]:
    """Validation errors (pydantic's, or FastAPI's request errors) as [{field, message, got}]; an unknown
    field's message lists `model`'s fields (default: GenerateRequest's).

    No URLs, no internals, long or odd inputs left out: safe to send to clients as it is.
    """
    if isinstance(errors, ValidationError):
        errors = errors.errors(include_url=False)
    out = []
    for e in errors:
        field = ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "body"
        got = e.get("input")
        if isinstance(got, float) and not math.isfinite(got):
            got = str(got)
        elif not isinstance(got, (str, int, float, bool, type(None))):
            got = None
        elif isinstance(got, str) and len(got) > 80:
            got = got[:77] + "..."
        message = e.get("msg", "invalid")
        if e.get("type") == "extra_forbidden":
            message = f"unknown field; allowed: {', '.join((model or GenerateRequest).model_fields)}"
        out.append({"field": field, "message": message, "got": got})
    return out


def error_text(err: ValidationError) -> str:
    return "; ".join(f"{e['field']}: {e['message']} (got {e['got']!r})" for e in describe_errors(err))


def _check_compression(value: int | None, output_format: str | None) -> int | None:
    if value is not None and output_format in (None, "png"):
        raise ValueError(f"output_compression applies to output_format jpeg and webp only; got it with "
                         f"{output_format or 'png'!r} (PNG is lossless)")
    return value


class GenerateResult(BaseModel):
    """A finished image and how it was made."""

    request_id: str = Field(description="This image's id; its invisible watermark carries it (POST /v1/watermark/detect).")
    image_b64: str | None = Field(default=None, description="The image file, base64-encoded (response_format b64_json).")
    url: str | None = Field(default=None, description="Where to GET the image (response_format url); expires.")
    output_format: OutputFormat = Field(default="png", description="The file's format: png, jpeg or webp.")
    seed: int
    width: int
    height: int
    size: Tier
    aspect_ratio: Aspect
    mode: Mode
    scheduler: SchedulerName
    guidance_scale: float | None = Field(
        default=None, description="The guidance it ran at: the request's, else the model's for the mode."
    )  # (None only in results stored before the field existed)
    model: str
    steps: dict[str, int] = Field(description="Steps and tiles actually run per stage.")
    timings: dict[str, float] = Field(description="Seconds spent per stage.")
    prompt_truncated: bool = Field(description="The prompt was cut at the encoder's token limit.")
    replicas: dict[str, list[str]] = Field(default_factory=dict, description="Replica ids that served each stage.")
    regions: dict[str, list[str]] = Field(
        default_factory=dict, description="Regions whose replicas served each stage (ingress, encode, base, upscale, "
        "refine, compose); empty when the cluster has no regions.")
    base_batch_size: int = Field(default=1, description="Requests denoised together with this one (dynamic batching).")

    @property
    def media_type(self) -> str:
        return MEDIA_TYPES[self.output_format]

    def image_bytes(self) -> bytes:
        """The image file (PNG unless the request asked for another output_format)."""
        import base64

        if self.image_b64 is None:
            raise ValueError("this result carries a url, not the image itself")
        return base64.b64decode(self.image_b64)

    def png(self) -> bytes:
        """The PNG file (a result of output_format png, the default)."""
        if self.output_format != "png":
            raise ValueError(f"this result is {self.output_format}, not png: use image_bytes()")
        return self.image_bytes()


# --- errors: every refusal and failure has this body ------------------------------------------------------------


class ErrorDetail(BaseModel):
    model_config = ConfigDict(extra="allow")  # per kind: errors (field list), retry_after, limit, allowed, ...

    type: str = Field(description="invalid_request, unauthorized, limit_exceeded, overloaded, timeout, ...")
    message: str


class ErrorBody(BaseModel):
    error: ErrorDetail


ERROR_STATUSES = {
    400: "Unparsable body, or the prompt is refused by the content policy",
    401: "Missing or wrong API key",
    403: "No API keys configured and the client is not on loopback",
    404: "No such model or stored output",
    408: "The request ran past its timeout and was cancelled",
    409: "The Idempotency-Key was used with another body",
    413: "The body is too large",
    422: "Invalid request (the fields, rules and values), or a configured limit exceeded",
    500: "A stage failed (no stack trace is sent)",
    503: "At capacity, or a replica was lost: retry after Retry-After seconds",
}


def error_responses(*statuses: int) -> dict:
    """FastAPI `responses=` for a route: each status it can answer, with the error body's schema."""
    return {status: {"model": ErrorBody, "description": ERROR_STATUSES[status]} for status in statuses}


# --- OpenAI Images API (POST /v1/images/generations) -----------------------------------------------------------

OPENAI_SIZES = {  # "WxH" -> (tier, aspect ratio): every exact output size Flashtile makes
    "%dx%d" % output_size(tier, aspect, base_resolution=0): (tier, aspect) for tier in TIERS[1:] for aspect in ASPECTS
}


class ImagesRequest(BaseModel):
    """OpenAI's image-generation request; Flashtile's own fields ride along as extra body fields."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    model: str | None = Field(default=None, description="The served model's id (GET /v1/models), or omitted.")
    n: int = Field(default=1, ge=1, le=4, strict=True, description="Images to generate (seeds seed, seed+1, ...).")
    size: str | None = Field(
        default=None, description="'auto' (1024x1024) or an exact output size such as 1024x1024 or 4096x2304."
    )
    response_format: Literal["b64_json", "url"] = Field(default="b64_json", description="b64_json or url.")
    output_format: OutputFormat | None = Field(default=None, description="png (default), jpeg or webp.")
    output_compression: int | None = Field(
        default=None, ge=0, le=100, strict=True, description="Quality of jpeg and webp, 0-100 (default 100); not for png."
    )
    quality: Literal["auto", "standard", "hd", "low", "medium", "high"] | None = Field(
        default=None, description="low -> fast mode; hd/high -> quality mode; else the default."
    )
    style: str | None = Field(default=None, description="Accepted for compatibility; not used.")
    user: str | None = Field(default=None, max_length=256, description="Accepted for compatibility; not used.")
    # Flashtile extensions (the native API's fields):
    negative_prompt: str = Field(default="", max_length=MAX_PROMPT_CHARS)
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED, strict=True)
    tier: Tier | None = Field(default=None, description="Overrides the tier implied by `size`.")
    aspect_ratio: Aspect | None = Field(default=None, description="Overrides the aspect ratio implied by `size`.")
    mode: Mode | None = None
    steps: int | None = Field(default=None, ge=1, le=MAX_STEPS, strict=True)
    guidance_scale: float | None = Field(default=None, ge=0.0, le=MAX_GUIDANCE, allow_inf_nan=False, strict=True)
    scheduler: SchedulerName | None = None
    timeout_s: float | None = Field(default=None, gt=0, le=MAX_TIMEOUT_S, allow_inf_nan=False, strict=True)

    @field_validator("output_compression")
    @classmethod
    def _compression_fits_format(cls, value, info):
        return _check_compression(value, info.data.get("output_format"))

    @field_validator("size")
    @classmethod
    def _known_size(cls, value: str | None) -> str | None:
        if value not in (None, "auto") and value not in OPENAI_SIZES:
            raise ValueError(f"size must be 'auto' or one of {', '.join(OPENAI_SIZES)}; got {value!r}")
        return value

    def to_generate(self, index: int = 0) -> GenerateRequest:
        """The native request for image `index` of `n` (seed + index when a seed is given)."""
        tier, aspect = OPENAI_SIZES.get(self.size or "auto", ("1k", "1:1"))
        mode = self.mode or {"low": "fast", "hd": "quality", "high": "quality"}.get(self.quality or "")
        return GenerateRequest(
            prompt=self.prompt, negative_prompt=self.negative_prompt,
            seed=None if self.seed is None else min(self.seed + index, MAX_SEED),
            size=self.tier or tier, aspect_ratio=self.aspect_ratio or aspect, mode=mode, steps=self.steps,
            guidance_scale=self.guidance_scale, scheduler=self.scheduler, response_format=self.response_format,
            output_format=self.output_format or "png", output_compression=self.output_compression, timeout_s=self.timeout_s,
        )


class ImageData(BaseModel):
    b64_json: str | None = None
    url: str | None = None
    revised_prompt: str | None = None
    seed: int


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]
    output_format: OutputFormat = "png"


# --- watermark detection (POST /v1/watermark/detect) -----------------------------------------------------------


class WatermarkDetectRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    image_b64: str = Field(min_length=1, description="The image (PNG, JPEG or WebP), base64-encoded.")


class WatermarkDetectResult(BaseModel):
    watermarked: bool = Field(description="Flashtile's mark is there (its tag and checksum match).")
    request_id: str | None = Field(default=None, description="The request id the mark holds (GenerateResult.request_id).")
    width: int
    height: int
    bit_agreement: float = Field(description="Share of the mark's bit copies that agree (about 0.6 without a mark, 1.0 with).")
    method: str = Field(description="The watermark method that was looked for.")
