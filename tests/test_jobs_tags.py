"""`--tag KEY=VALUE`: parsing, the Ray metadata that holds tags, and `list` filtering. (The
round trip through a real head and MLflow is in test_jobs_submit.py.)"""
from __future__ import annotations

import pytest

from orchestration.tags import as_args, from_metadata, matches, parse_tags, to_metadata
from pretrain.errors import UserError


def test_tags_parse_and_survive_the_metadata_round_trip():
    tags = parse_tags(["team=vision", "sweep=lr=3e-4", "note="])
    assert tags == {"team": "vision", "sweep": "lr=3e-4", "note": ""}
    meta = {"pretrain_name": "a", **to_metadata(tags)}
    assert from_metadata(meta) == tags and from_metadata(None) == {}
    assert as_args({"team": "vision"}) == ["--tag", "team=vision"]


@pytest.mark.parametrize("bad", ["team", "=x", "bad key=1", "-lead=1", "k" * 64 + "=1"])
def test_bad_tags_name_the_argument(bad):
    with pytest.raises(UserError, match="is not KEY=VALUE"):
        parse_tags([bad])


def test_a_tag_value_with_credentials_is_refused():
    with pytest.raises(UserError, match="--tag url holds credentials"):
        parse_tags(["url=https://u:p@host/x"])


def test_list_filters_need_every_pair():
    tags = {"team": "vision", "sweep": "a"}
    assert matches(tags, {}) and matches(tags, {"team": "vision"})
    assert matches(tags, {"team": "vision", "sweep": "a"})
    assert not matches(tags, {"team": "vision", "sweep": "b"}) and not matches({}, {"team": "x"})
