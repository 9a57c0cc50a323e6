"""A manifest that is valid JSON but not a manifest object is refused with the reason, as any other damaged one."""

import pytest

from pipeline.data.shard_format import Manifest


@pytest.mark.parametrize("text", ["[]", '"shards"', "3", "null", '{"format": 1, "shards": 7}'])
def test_json_that_is_not_a_manifest_object_is_a_value_error_naming_the_file(text):
    with pytest.raises(ValueError, match=r"^/x/digits-train.manifest.json is not a valid augssl shard manifest: "):
        Manifest.from_json(text, where="/x/digits-train.manifest.json")
