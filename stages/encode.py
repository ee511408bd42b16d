"""Prompt encoder: tokenizer(s) + text encoder(s) -> token embeddings (and SDXL's pooled embedding)."""

from stages import _torchvision_compat  # noqa: F401  (first: see that module)
import threading
from collections import OrderedDict

import torch

from stages.models import ModelDir
from stages.types import PromptEmbeds


class PromptEncoder:
    """Encodes a prompt and its negative; an LRU cache keyed by (model, text) skips repeated prompts.

    SD-family models use the last hidden state of one encoder. SDXL concatenates the penultimate hidden
    states of two CLIP encoders and takes the pooled embedding from the second.
    """

    def __init__(self, tokenizers: list, text_encoders: list, model_id: str, family: str = "sd", cache_size: int = 256):
        if family not in ("sd", "sdxl"):
            raise ValueError(f"family must be 'sd' or 'sdxl'; got {family!r}")
        if len(tokenizers) != len(text_encoders) or len(tokenizers) != (2 if family == "sdxl" else 1):
            raise ValueError(f"a {family} model needs {2 if family == 'sdxl' else 1} tokenizer/encoder pair(s)")
        self.tokenizers = tokenizers
        self.text_encoders = text_encoders
        self.model_id = model_id
        self.family = family
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple[str, str], tuple] = OrderedDict()
        self._lock = threading.Lock()

    @classmethod
    def from_pretrained(cls, model: ModelDir, device="cpu", dtype=torch.float32, **kwargs) -> "PromptEncoder":
        tokenizers, encoders = model.text_components(dtype)
        return cls(tokenizers, [e.to(device) for e in encoders], model.model_id, model.family, **kwargs)

    @property
    def token_limit(self) -> int:
        return min(t.model_max_length for t in self.tokenizers)

    @property
    def device(self) -> torch.device:
        return next(self.text_encoders[0].parameters()).device

    def __call__(self, prompt: str, negative_prompt: str = "") -> PromptEmbeds:
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError("prompt must be a non-empty string")
        embeds, pooled, truncated, hit = self._encode_cached(prompt)
        if self.family == "sdxl" and not negative_prompt:
            # SDXL convention (force_zeros_for_empty_prompt): an empty negative is all zeros.
            neg, neg_pooled = torch.zeros_like(embeds), torch.zeros_like(pooled)
        else:
            neg, neg_pooled, _, _ = self._encode_cached(negative_prompt)
        return PromptEmbeds(
            model_id=self.model_id,
            prompt_embeds=embeds,
            negative_embeds=neg,
            pooled=pooled,
            negative_pooled=neg_pooled,
            truncated=truncated,
            token_limit=self.token_limit,
            cache_hit=hit,
        )

    def _encode_cached(self, text: str) -> tuple:
        key = (self.model_id, text)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return (*self._cache[key], True)
        value = self._encode(text)
        with self._lock:
            self._cache[key] = value
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return (*value, False)

    @torch.inference_mode()
    def _encode(self, text: str) -> tuple[torch.Tensor, torch.Tensor | None, bool]:
        states, pooled, truncated = [], None, False
        for tokenizer, encoder in zip(self.tokenizers, self.text_encoders):
            limit = tokenizer.model_max_length
            # 1. Tokenize to the encoder's fixed context; note whether the prompt did not fit.
            full = tokenizer(text, truncation=False, add_special_tokens=True)["input_ids"]
            truncated = truncated or len(full) > limit
            batch = tokenizer(text, padding="max_length", max_length=limit, truncation=True, return_tensors="pt")
            ids = batch["input_ids"].to(self.device)
            # 2. Encode. CLIP (trained without a mask) attends to its padding, as every SD checkpoint expects;
            #    BERT-style encoders get their attention mask.
            is_clip = "CLIP" in type(encoder).__name__
            mask = None if is_clip else batch["attention_mask"].to(self.device)
            out = encoder(ids, attention_mask=mask, output_hidden_states=self.family == "sdxl")
            if self.family == "sdxl":
                states.append(out.hidden_states[-2])  # [1, T, D_i]
                pooled = out[0]  # the last encoder's projected pooled output: [1, P]
            else:
                states.append(out[0])  # last_hidden_state: [1, T, D]
        embeds = torch.cat(states, dim=-1) if len(states) > 1 else states[0]  # [1, T, sum(D_i)]
        return embeds, pooled, truncated
