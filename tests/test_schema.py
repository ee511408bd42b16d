"""Request schema and tier table: every bad input is refused with the field and the allowed values."""

import json

import pytest
from pydantic import ValidationError

from deployments.schemas import GenerateRequest, describe_errors
from stages.pipeline import resolve_params
from stages.sizes import ASPECTS, TIERS, base_size, output_size

BAD = [
    ({"prompt": ""}, "prompt", "at least 1 character"),
    ({"prompt": "x" * 2001}, "prompt", "at most 2000 characters"),
    ({"prompt": "   "}, "prompt", "non-whitespace"),
    ({"prompt": "a", "colour": "red"}, "colour", "allowed: prompt, negative_prompt, seed"),
    ({"prompt": "a", "size": "8k"}, "size", "'preview', '1k', '2k' or '4k'"),
    ({"prompt": "a", "aspect_ratio": "7:3"}, "aspect_ratio", "'1:1', '4:3', '3:4', '16:9' or '9:16'"),
    ({"prompt": "a", "steps": 0}, "steps", "greater than or equal to 1"),
    ({"prompt": "a", "steps": 10000}, "steps", "less than or equal to 150"),
    ({"prompt": "a", "guidance_scale": float("nan")}, "guidance_scale", "finite number"),
    ({"prompt": "a", "seed": -1}, "seed", "greater than or equal to 0"),
    ({"prompt": "a", "mode": "turbo"}, "mode", "'fast' or 'quality'"),
    ({"prompt": "a", "scheduler": "lms"}, "scheduler", "'euler', 'dpmpp_2m_karras', 'hybrid' or 'ddim'"),
    ({"prompt": "a", "size": "preview", "mode": "quality"}, "mode", "must be 'fast' for size 'preview'"),
    ({"prompt": "a", "output_format": "gif"}, "output_format", "'png', 'jpeg' or 'webp'"),
    ({"prompt": "a", "guidance_scale": False}, "guidance_scale", "valid number"),
    ({"prompt": "a", "steps": True}, "steps", "valid integer"),
    ({"prompt": "a", "seed": "7"}, "seed", "valid integer"),
    ({"prompt": "a", "output_compression": 80}, "output_compression", "jpeg and webp only; got it with 'png'"),
    ({"prompt": "a", "output_format": "jpeg", "output_compression": 101}, "output_compression", "less than or equal to 100"),
]


@pytest.mark.parametrize("body,field,message", BAD, ids=[b[1] + ":" + b[2][:20] for b in BAD])
def test_bad_request_names_field_and_allowed_values(body, field, message):
    with pytest.raises(ValidationError) as info:
        GenerateRequest(**body)
    errors = describe_errors(info.value)
    assert [e["field"] for e in errors] == [field]
    assert message in errors[0]["message"]
    json.dumps(errors)  # safe to send to a client as it is


def test_nan_in_json_body_is_refused():
    with pytest.raises(ValidationError) as info:
        GenerateRequest.model_validate_json('{"prompt": "a", "guidance_scale": NaN}')
    assert describe_errors(info.value)[0]["field"] == "guidance_scale"


def test_good_request_resolves_defaults():
    request = GenerateRequest(prompt="a lighthouse at dusk", size="4k", aspect_ratio="16:9")
    params = resolve_params(**request.stage_fields())
    assert params.mode == "quality" and params.steps == 30
    assert 0 <= params.seed < 2**31
    preview = resolve_params("a", size="preview")
    assert preview.mode == "fast" and preview.steps == 4


def test_tier_table_exact_sizes():
    assert output_size("4k", "16:9", 1024) == (4096, 2304)
    assert output_size("2k", "9:16", 1024) == (1152, 2048)
    assert output_size("1k", "4:3", 1024) == (1024, 768)
    for tier in TIERS[1:]:
        for aspect in ASPECTS:
            w, h = output_size(tier, aspect, 256)
            rw, rh = map(int, aspect.split(":"))
            assert max(w, h) == {"1k": 1024, "2k": 2048, "4k": 4096}[tier]
            assert w * rh == h * rw  # the aspect ratio is exact


def test_base_sizes_follow_the_model():
    assert base_size("16:9", 1024) == (1344, 768)  # SDXL's own 16:9 bucket
    assert base_size("1:1", 256, 16) == (256, 256)
    for aspect in ASPECTS:
        w, h = base_size(aspect, 1024)
        assert w % 64 == 0 and h % 64 == 0 and 0.85 < w * h / 1024**2 < 1.15
    with pytest.raises(ValueError, match="aspect_ratio must be one of"):
        base_size("7:3", 1024)
    with pytest.raises(ValueError, match="size must be one of"):
        output_size("8k", "1:1", 1024)


def test_unknown_field_lists_the_fields_of_the_model_that_was_sent():
    from deployments.schemas import ImagesRequest

    with pytest.raises(ValidationError) as info:
        ImagesRequest(prompt="a", colour="red")
    (error,) = describe_errors(info.value, ImagesRequest)
    assert error["field"] == "colour" and "allowed: prompt, model, n, size" in error["message"]
