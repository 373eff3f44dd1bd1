"""RecommendedInferenceImage resolution from configs/images.yaml (reference 6.1)."""

from __future__ import annotations

import pytest

from optjob.package.images import recommended_image


def test_default_account_region():
    assert recommended_image("lmi", "us-west-2") == (
        "763104351884.dkr.ecr.us-west-2.amazonaws.com/djl-inference:0.36.0-lmi27.0.0-cu130"
    )


def test_china_uses_cn_suffix_and_account():
    uri = recommended_image("lmi", "cn-north-1")
    assert uri.startswith("727897471807.dkr.ecr.cn-north-1.amazonaws.com.cn/djl-inference:")


def test_other_account_regions_and_frameworks():
    assert recommended_image("tensorrtllm", "af-south-1").startswith(
        "626614931356.dkr.ecr.af-south-1.amazonaws.com/djl-inference:0.33.0-tensorrtllm"
    )
    assert recommended_image("neuronx", "us-east-1") == (
        "763104351884.dkr.ecr.us-east-1.amazonaws.com/huggingface-vllm-inference-neuronx:"
        "0.11.0-optimum0.4.5-neuronx-py310-sdk2.26.1-ubuntu22.04"
    )


def test_explicit_image_wins():
    mine = "123456789012.dkr.ecr.us-east-1.amazonaws.com/djl-inference:0.28.0-lmi10.0.0-cu124"
    assert recommended_image("lmi", "us-east-1", explicit_image=mine) == mine


def test_unknown_inputs_name_the_problem():
    with pytest.raises(KeyError, match="unknown image framework"):
        recommended_image("tgi", "us-east-1")
    with pytest.raises(KeyError, match="mars-1"):
        recommended_image("lmi", "mars-1")
    with pytest.raises(KeyError, match="not published"):
        recommended_image("neuronx", "ap-northeast-2")


def test_sharded_state_image_is_the_vllm_release_of_the_layout():
    from optjob.techniques.shard.layout import vllm_version

    for region in ("us-east-1", "cn-north-1"):
        assert recommended_image("vllm-sharded-state", region) == f"vllm/vllm-openai:v{vllm_version()}"
