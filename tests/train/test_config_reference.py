"""docs/config-reference.md is generated from the comments where each key is defined, and cannot drift from them."""

import pytest

from jaxtune import configs
from jaxtune.train import config_reference
from jaxtune.train.config import default_config


def test_the_reference_page_is_up_to_date():
  assert config_reference.DOC.read_text() == config_reference.markdown(), (
    "docs/config-reference.md is out of date: run python -m jaxtune.train.config_reference --write"
  )


def test_every_key_has_a_meaning_and_a_line_on_the_page():
  found = config_reference.meanings()
  page = config_reference.DOC.read_text()
  for key in configs.leaves(default_config()):
    assert found.get(key), f"{key}: no comment where it is defined"
    assert f"- `{key}` = " in page


def test_a_key_without_a_comment_fails(monkeypatch):
  real = config_reference.meanings
  monkeypatch.setattr(config_reference, "meanings", lambda: {**real(), "train.steps": ""})
  with pytest.raises(config_reference.ReferenceError, match="train.steps: no comment where the key is defined"):
    config_reference.markdown()
