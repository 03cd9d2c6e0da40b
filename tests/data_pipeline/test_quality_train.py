import yaml

from cluster.cli import main
from data_pipeline.filters.quality import QualityModel


def test_classifier_trains_on_reference_vs_crawl_and_loads(tmp_path, shared_data):
    config = {"tokenizer": {"path": str(shared_data / "tokenizer/gpt2/r50k_base.tiktoken")},
              "sources": [{"name": "books", "weight": 1, "format": "books", "max_doc_chars": 20000,
                           "inputs": [str(shared_data / "books/austen_persuasion.txt")]},
                          {"name": "web", "weight": 1, "format": "warc", "extract": {"watchdog": False},
                           "inputs": [str(shared_data / "web/iana.warc.gz")]}]}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    out = tmp_path / "q.npz"
    assert main(["data", "train-quality-classifier", str(tmp_path / "c.yaml"), "--positive", "books",
                 "--negative", "web", "--out", str(out)]) == 0
    assert out.stat().st_size < 2_000_000
    model = QualityModel(out)
    book_like = (shared_data / "books/austen_emma.txt").read_text()[30000:34000]
    crawl_like = "Domain Names | Number Resources | Protocol Assignments | About IANA | Contact | Privacy Policy"
    low, high = model.scores([crawl_like, book_like])
    assert high > low
