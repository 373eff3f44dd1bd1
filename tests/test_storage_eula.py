"""AcceptEula: gated by where the model lives (configs/gated-sources.yaml) or by its model card."""

from __future__ import annotations

from pathlib import Path

import pytest

from optjob.storage.eula import ACCEPT_FIELD, gated_config, gated_source_reason, model_card_gating


def test_shipped_config_lists_jumpstart_cache_and_llama_gemma_licenses() -> None:
    config = gated_config()
    assert any(source.bucket == "jumpstart-private-cache-*" for source in config.sources)
    for license_id in ("llama2", "llama3", "llama3.1", "llama3.2", "llama3.3", "llama4", "gemma"):
        assert config.license_name(license_id)


@pytest.mark.parametrize(
    "uri",
    [
        "s3://jumpstart-private-cache-prod-us-west-2/meta-textgeneration/llama-3-8b/artifacts/v1/",
        "https://jumpstart-private-cache-prod-eu-west-1.s3.eu-west-1.amazonaws.com/meta/x/",
        "https://s3.us-east-1.amazonaws.com/jumpstart-private-cache-alpha-us-east-1/m/",
    ],
)
def test_gated_source(uri: str) -> None:
    reason = gated_source_reason(uri)
    assert reason is not None
    assert "JumpStart private model cache" in reason and ACCEPT_FIELD in reason


@pytest.mark.parametrize("uri", ["s3://jumpstart-cache-prod-us-west-2/m/", "s3://my-models/private-cache/"])
def test_ungated_source(uri: str) -> None:
    assert gated_source_reason(uri) is None


def test_site_config_adds_prefix_globs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "gated-sources.yaml").write_text(
        "sources:\n  - {bucket: 'corp-*', prefix: 'licensed/*', reason: 'licensed corporate models'}\n"
    )
    monkeypatch.setenv("OPTJOB_CONFIG_DIR", str(tmp_path))
    assert "licensed corporate models" in (gated_source_reason("s3://corp-ml/licensed/m/") or "")
    assert gated_source_reason("s3://corp-ml/open/m/") is None


def _card(tmp_path: Path, front_matter: str) -> Path:
    (tmp_path / "README.md").write_text(f"---\n{front_matter}\n---\n# Model\nSome text.\n")
    return tmp_path


@pytest.mark.parametrize(
    ("front_matter", "license_id", "name"),
    [
        ("license: llama3.1\nlanguage: [en]", "llama3.1", "Llama 3.1 Community License"),
        ("license: Gemma", "Gemma", "Gemma Terms of Use"),
        ("license: other\nlicense_name: llama4", "llama4", "Llama 4 Community License"),
        ("license: [apache-2.0, llama2]", "llama2", "Llama 2 Community License"),
    ],
)
def test_card_license_requires_acceptance(tmp_path: Path, front_matter: str, license_id: str, name: str) -> None:
    reason = model_card_gating(_card(tmp_path, front_matter))
    assert reason is not None
    assert f"license '{license_id}' ({name})" in reason and ACCEPT_FIELD in reason


def test_card_gating_fields(tmp_path: Path) -> None:
    front = (
        "license: apache-2.0\nextra_gated_prompt: Agree to share your contact info\nextra_gated_fields:\n  Name: text"
    )
    reason = model_card_gating(_card(tmp_path, front))
    assert reason is not None
    assert "extra_gated_prompt, extra_gated_fields" in reason and "license: apache-2.0" in reason
    assert ACCEPT_FIELD in reason


def test_broken_yaml_still_reveals_license(tmp_path: Path) -> None:
    reason = model_card_gating(_card(tmp_path, "license: llama3\ntags: [unclosed"))
    assert reason is not None and "llama3" in reason


@pytest.mark.parametrize("text", ["---\nlicense: apache-2.0\n---\n", "# No front matter\nlicense: llama3\n"])
def test_ungated_cards(tmp_path: Path, text: str) -> None:
    (tmp_path / "README.md").write_text(text)
    assert model_card_gating(tmp_path) is None


def test_no_card(tmp_path: Path) -> None:
    assert model_card_gating(tmp_path) is None
