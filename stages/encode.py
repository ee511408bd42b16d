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
        return self.encode_batch([(prompt, negative_prompt)])[0]

    def encode_batch(self, pairs: list[tuple[str, str]]) -> list[PromptEmbeds]:
        """Encode (prompt, negative) pairs; every text not in the cache goes through one forward pass."""
        for prompt, _ in pairs:
            if not isinstance(prompt, str) or not prompt.strip():
                raise ValueError("prompt must be a non-empty string")
        # 1. Look every text up in the cache; encode the missing ones together.
        # SDXL convention (force_zeros_for_empty_prompt): an empty negative is all zeros, never encoded.
        wanted = {t for p, n in pairs for t in (p, n) if not (self.family == "sdxl" and t == "")}
        found = {}
        with self._lock:
            for text in wanted:
                if (self.model_id, text) in self._cache:
                    self._cache.move_to_end((self.model_id, text))
                    found[text] = self._cache[(self.model_id, text)]
        missing = sorted(wanted - set(found))
        if missing:
            fresh = dict(zip(missing, self._encode(missing)))
            found.update(fresh)
            with self._lock:
                for text, value in fresh.items():
                    self._cache[(self.model_id, text)] = value
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        # 2. Assemble each request's conditioning.
        out = []
        for prompt, negative in pairs:
            embeds, pooled, truncated = found[prompt]
            if self.family == "sdxl" and not negative:
                neg, neg_pooled = torch.zeros_like(embeds), torch.zeros_like(pooled)
            else:
                neg, neg_pooled, _ = found[negative]
            out.append(PromptEmbeds(
                model_id=self.model_id, prompt_embeds=embeds, negative_embeds=neg, pooled=pooled,
                negative_pooled=neg_pooled, truncated=truncated, token_limit=self.token_limit,
                cache_hit=prompt not in missing,
            ))
        return out

    @torch.inference_mode()
    def _encode(self, texts: list[str]) -> list[tuple[torch.Tensor, torch.Tensor | None, bool]]:
        """One forward pass per encoder for all `texts`: [(embeds [1, T, D], pooled [1, P] | None, truncated)]."""
        states, pooled, truncated = [], None, [False] * len(texts)
        for tokenizer, encoder in zip(self.tokenizers, self.text_encoders):
            limit = tokenizer.model_max_length
            # 1. Tokenize to the encoder's fixed context; note which prompts did not fit.
            for i, ids in enumerate(tokenizer(texts, truncation=False, add_special_tokens=True)["input_ids"]):
                truncated[i] = truncated[i] or len(ids) > limit
            batch = tokenizer(texts, padding="max_length", max_length=limit, truncation=True, return_tensors="pt")
            ids = batch["input_ids"].to(self.device)  # [B, T]
            # 2. Encode. CLIP (trained without a mask) attends to its padding, as every SD checkpoint expects;
            #    BERT-style encoders get their attention mask.
            is_clip = "CLIP" in type(encoder).__name__
            mask = None if is_clip else batch["attention_mask"].to(self.device)
            out = encoder(ids, attention_mask=mask, output_hidden_states=self.family == "sdxl")
            if self.family == "sdxl":
                states.append(out.hidden_states[-2])  # [B, T, D_i]
                pooled = out[0]  # the last encoder's projected pooled output: [B, P]
            else:
                states.append(out[0])  # last_hidden_state: [B, T, D]
        embeds = torch.cat(states, dim=-1) if len(states) > 1 else states[0]  # [B, T, sum(D_i)]
        return [
            # clone: a cached row must not keep the whole batch's tensor alive
            (embeds[i : i + 1].clone(), None if pooled is None else pooled[i : i + 1].clone(), truncated[i])
            for i in range(len(texts))
        ]
