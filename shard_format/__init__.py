"""The shard contract between `data_pipeline` (writes) and `trainer` (reads), in one leaf package
that both import and that imports neither (DESIGN.md § Shard format and manifest): the manifest's
format version, types, loading and validation; checksums and atomic writes; the token dtype; and
the tokenizer a manifest records."""
from shard_format.files import atomic_write, sha256_file
from shard_format.manifest import (FORMAT_VERSION, MANIFEST_NAME, Manifest, ManifestError, ShardRecord, SourceRecord,
                                   TokenizerRecord, epochs_per_source, load_manifest, make_manifest, validate_manifest,
                                   write_manifest)
from shard_format.tokenizer import EOT_TEXT, TokenizerError, encoding_for, load_encoding
from shard_format.tokens import token_dtype

__all__ = ["EOT_TEXT", "FORMAT_VERSION", "MANIFEST_NAME", "Manifest", "ManifestError", "ShardRecord", "SourceRecord",
           "TokenizerError", "TokenizerRecord", "atomic_write", "encoding_for", "epochs_per_source", "load_encoding", "load_manifest",
           "make_manifest", "sha256_file", "token_dtype", "validate_manifest", "write_manifest"]
