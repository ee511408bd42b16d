"""What the ingress refuses before any model work: who may call, how big a body may be, what a request may cost,
and which prompts the operator's policy blocks.

Everything here is pure policy (no Ray, no models), so it is unit-tested directly and applied by one ASGI
middleware plus one check per request in the ingress.
"""

import hashlib
import hmac
import ipaddress
import os
import re
import unicodedata
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

from deployments.schemas import MAX_PROMPT_CHARS, MAX_STEPS, GenerateRequest
from stages.pipeline import resolve_params
from stages.sizes import TIERS, Tier, output_size

KEYS_ENV = "FLASHTILE_API_KEYS"
OPEN_PATHS = ("/healthz", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc")
OPEN_PREFIXES = ("/v1/outputs/",)  # capability URLs: 128 random bits in the key are the permission


# --- API keys ---------------------------------------------------------------------------------------------------


def key_hash(key: str) -> str:
    """The form a key is kept in: `sha256:<hex>`. Configs may hold this instead of the key itself."""
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


class ApiKeys:
    """Accepted API keys, held only as SHA-256 digests and compared in constant time.

    Entries are plain keys or `sha256:<hex>` digests, from the config's `api_keys` and from the environment
    variable FLASHTILE_API_KEYS (comma-separated). With none, only loopback clients are served.
    """

    def __init__(self, entries: list[str] = (), environ: dict | None = None):
        env = (os.environ if environ is None else environ).get(KEYS_ENV, "")
        raw = [e.strip() for e in [*entries, *env.split(",")] if e.strip()]
        self._digests = sorted({bytes.fromhex(e[7:]) if e.startswith("sha256:") else hashlib.sha256(e.encode()).digest() for e in raw})
        del raw  # plain keys are not kept

    def __len__(self) -> int:
        return len(self._digests)

    def check(self, presented: str | None) -> str | None:
        """The key's id (first 12 hex digits of its digest) when it is accepted, else None.

        Every stored digest is compared, whatever matches: the time taken does not say which one was close.
        """
        if not presented:
            return None
        digest = hashlib.sha256(presented.encode()).digest()
        match = None
        for stored in self._digests:
            if hmac.compare_digest(digest, stored):
                match = stored
        return None if match is None else match.hex()[:12]


def is_loopback(host: str | None) -> bool:
    try:
        return host is not None and ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


@dataclass
class Denied:
    status: int
    kind: str
    message: str


def authorize(keys: ApiKeys, path: str, authorization: str | None, client_host: str | None) -> str | Denied:
    """Who is calling (a key id, "open" or "loopback"), or why not. Health and docs routes are open."""
    if path in OPEN_PATHS or path.startswith(OPEN_PREFIXES):
        return "open"
    if not len(keys):
        if is_loopback(client_host):
            return "loopback"
        return Denied(403, "forbidden", f"no API keys are configured, so this server only serves loopback clients; "
                                        f"set {KEYS_ENV} (docs/operations.md: API keys) to serve others")
    scheme, _, token = (authorization or "").partition(" ")
    key_id = keys.check(token.strip()) if scheme.lower() == "bearer" else None
    if key_id is None:
        what = "invalid API key" if authorization else "missing API key"
        return Denied(401, "unauthorized", f"{what}: send the header 'Authorization: Bearer <key>'")
    return key_id


# --- request limits -------------------------------------------------------------------------------------------


class Limits(BaseModel):
    """Per-request caps, enforced at the ingress before any model work (the `limits` of cluster.yaml's args)."""

    model_config = ConfigDict(extra="forbid")

    max_body_bytes: int = Field(default=64 * 1024, ge=1024, le=1 << 30, description="Largest JSON body of a generation route.")
    max_image_bytes: int = Field(
        default=48 * 1024 * 1024, ge=1024, le=1 << 30, description="Largest body of /v1/watermark/detect (a base64 image)."
    )
    max_prompt_chars: int = Field(default=MAX_PROMPT_CHARS, ge=1, le=MAX_PROMPT_CHARS, description="Longest prompt.")
    max_images: int = Field(default=4, ge=1, le=4, description="Images per request (the OpenAI API's n).")
    max_steps: int = Field(default=MAX_STEPS, ge=1, le=MAX_STEPS, description="Most base denoising steps per image.")
    max_tier: Tier = Field(default="4k", description="Largest output tier served.")
    max_megapixel_steps: float = Field(
        default=2100.0, gt=0, description="Budget per request: images x output megapixels x base steps "
        "(one 4k 1:1 image at 30 steps is 503; at 125 steps 2097).",
    )

    def body_limit(self, path: str) -> int:
        return self.max_image_bytes if path == "/v1/watermark/detect" else self.max_body_bytes

    def check(self, request: GenerateRequest, images: int = 1, base_resolution: int = 1024) -> "LimitExceeded | None":
        """The first limit `images` copies of `request` exceed, or None."""
        params = resolve_params(**request.stage_fields())  # pure: fills the default steps and mode
        width, height = output_size(params.size, params.aspect_ratio, base_resolution)
        cost = images * width * height / 1e6 * params.steps
        for name, got, allowed in (
            ("max_prompt_chars", len(request.prompt), self.max_prompt_chars),
            ("max_images", images, self.max_images),
            ("max_steps", params.steps, self.max_steps),
            ("max_tier", TIERS.index(params.size), TIERS.index(self.max_tier)),
            ("max_megapixel_steps", round(cost, 1), self.max_megapixel_steps),
        ):
            if got > allowed:
                if name == "max_tier":
                    got, allowed = params.size, self.max_tier
                return LimitExceeded(name, got, allowed)
        return None


@dataclass
class LimitExceeded:
    limit: str
    got: object
    allowed: object

    @property
    def message(self) -> str:
        return f"request exceeds the limit {self.limit} = {self.allowed} (got {self.got})"


# --- prompt policy --------------------------------------------------------------------------------------------


class PromptPolicy:
    """A blocklist of words, phrases (matched as whole words) and `re:`-prefixed regular expressions.

    Prompts are compared after Unicode NFKC normalisation and case folding, so "ＢＡＤ" matches "bad".
    """

    def __init__(self, entries: list[str] = ()):
        self._patterns = [compile_entry(e) for e in entries if e.strip()]

    def __len__(self) -> int:
        return len(self._patterns)

    def blocks(self, prompt: str) -> bool:
        text = unicodedata.normalize("NFKC", prompt).casefold()
        return any(p.search(text) for p in self._patterns)


def compile_entry(entry: str) -> re.Pattern:
    """`re:<regex>` as it is (case-insensitive), anything else as a whole word or phrase."""
    if entry.startswith("re:"):
        return re.compile(entry[3:], re.IGNORECASE)
    words = unicodedata.normalize("NFKC", entry.strip()).casefold().split()
    return re.compile(r"(?<!\w)" + r"\s+".join(map(re.escape, words)) + r"(?!\w)")
