import json

import pytest

from shard_format import (FORMAT_VERSION, MANIFEST_NAME, ManifestError, epochs_per_source, load_manifest, make_manifest,
                          write_manifest)

TOKENIZER = {"name": "gpt2", "vocab_size": 50257, "eot_id": 50256, "vocab_sha256": "306cd27f"}
SHARD = {"path": "books/shard-000000.tar", "source": "books", "samples": 17, "tokens": 1234, "bytes": 20480,
         "sha256": "ab12"}


def write_json(directory, data) -> str:
    path = directory / MANIFEST_NAME
    path.write_text(json.dumps(data))
    return str(path)


def test_written_manifest_loads_back_unchanged(tmp_path):
    manifest = make_manifest(TOKENIZER, {"books": 0.7, "wiki": 0.3}, [SHARD])
    write_manifest(tmp_path, manifest)
    assert load_manifest(tmp_path) == manifest
    assert manifest["format_version"] == FORMAT_VERSION and manifest["sources"]["books"] == {"weight": 0.7}
    text = (tmp_path / MANIFEST_NAME).read_text()
    assert text == json.dumps(manifest, indent=1) + "\n"
    assert [p.name for p in tmp_path.iterdir()] == [MANIFEST_NAME]  # no temp file left behind


def test_missing_manifest_names_the_file(tmp_path):
    with pytest.raises(ManifestError, match=f"{tmp_path / MANIFEST_NAME}: no manifest"):
        load_manifest(tmp_path)


def test_invalid_json_names_the_file(tmp_path):
    (tmp_path / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(ManifestError, match=f"{tmp_path / MANIFEST_NAME}: not valid JSON"):
        load_manifest(tmp_path)


@pytest.mark.parametrize("change, key", [
    ({"format_version": 2}, "format_version 2, this reader expects 1"),
    ({"tokenizer": {k: v for k, v in TOKENIZER.items() if k != "eot_id"}}, "tokenizer.eot_id: Field required"),
    ({"shards": [{**SHARD, "samples": "many"}]}, "shards.0.samples: Input should be a valid integer"),
    ({"shards": [{**SHARD, "tokens": -1}]}, "shards.0.tokens: Input should be greater than or equal to 0"),
    ({"sources": {"books": {"weight": -0.5}}}, "sources.books.weight"),
])
def test_malformed_manifest_names_the_file_and_the_key(tmp_path, change, key):
    path = write_json(tmp_path, {**make_manifest(TOKENIZER, {"books": 1.0}, [SHARD]), **change})
    with pytest.raises(ManifestError) as err:
        load_manifest(tmp_path)
    assert str(err.value).startswith(f"{path}: ") and key in str(err.value) and "\n" not in str(err.value)


def test_manifest_that_is_not_an_object_is_refused(tmp_path):
    path = write_json(tmp_path, [1, 2])
    with pytest.raises(ManifestError, match=f"{path}: not a JSON object"):
        load_manifest(tmp_path)


def test_epochs_per_source_follow_gpt3_table_2_2():
    """3B tokens of Wikipedia at 3% of 300B training tokens: 3 epochs (GPT-3 Table 2.2 has 3.4 for its 3B)."""
    shards = [{**SHARD, "source": "wiki", "tokens": 3_000_000_000}, {**SHARD, "source": "cc", "tokens": 400_000_000_000}]
    manifest = make_manifest(TOKENIZER, {"wiki": 0.03, "cc": 0.97}, shards)
    epochs = epochs_per_source(manifest, {"wiki": 3.0, "cc": 97.0}, 300e9)
    assert epochs["wiki"]["weight"] == pytest.approx(0.03) and epochs["wiki"]["epochs"] == pytest.approx(3.0)
    assert epochs["cc"]["epochs"] == pytest.approx(300e9 * 0.97 / 400e9)
    held = epochs_per_source(manifest, {"wiki": 3.0, "cc": 97.0}, 300e9, heldout_percent=50.0)
    assert held["wiki"]["epochs"] == pytest.approx(6.0)
