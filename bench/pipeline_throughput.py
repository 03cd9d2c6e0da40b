"""Benchmark: our filter chain and MinHash against datatrove's equivalent steps, and tiktoken
against Hugging Face `tokenizers`, on the same real documents in the same process.

    .venv/bin/python bench/pipeline_throughput.py [--data ../shared/data] [--json OUT]

Documents: the books split into ~5,000-character documents, the Wikipedia excerpt's
articles, and the crawl's HTML pages extracted to text. Chain: language ID -> Gopher
repetition -> Gopher quality -> C4 -> FineWeb -> MinHash signature. Throughput is per core
(CPU seconds of this single process, so other load on the machine does not count); decisions
are compared rule by rule on every document (each rule sees every document, not only the
survivors of earlier rules). Needs the `bench` extra (datatrove, tokenizers) and spacy, which
datatrove's English word tokenizer uses."""
from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_pipeline.dedup.minhash import MinHasher
from data_pipeline.document import Document, StepStats
from data_pipeline.extract import ExtractConfig, ExtractHtml
from data_pipeline.filters.c4 import C4Filter, C4FilterConfig
from data_pipeline.filters.fineweb import FineWebFilter, FineWebFilterConfig
from data_pipeline.filters.gopher import GopherQuality, GopherQualityConfig, GopherRepetition, GopherRepetitionConfig
from data_pipeline.filters.language import LanguageFilter, LanguageFilterConfig
from data_pipeline.readers import READERS
from data_pipeline.readers.text import split_text
from data_pipeline.step import run_steps
from shard_format import load_encoding

REPO = Path(__file__).resolve().parent.parent
RULES = ["language", "gopher_repetition", "gopher_quality", "c4", "fineweb"]


def load_documents(data: Path) -> list[Document]:
    docs: list[Document] = []
    for path in sorted((data / "books").glob("*.txt")):
        for book_doc in READERS["books"](path, "books", 0, StepStats(), max_doc_chars=10_000_000):
            docs += [Document(id=f"{book_doc.id}/{i}", text=t, source="books", key=0)
                     for i, t in enumerate(split_text(book_doc.text, 5000))]
    for path in sorted((data / "wiki").glob("*.bz2")):
        docs += list(READERS["wiki"](path, "wiki", 0, StepStats()))
    extract = ExtractHtml(ExtractConfig(watchdog=False))
    for path in sorted((data / "web").glob("*.warc.gz")):
        docs += list(run_steps(READERS["warc"](path, "web", 0, StepStats()), [extract], {}))
    return docs


def our_steps(data: Path) -> dict:
    return {"language": LanguageFilter(LanguageFilterConfig(model_path=str(data / "langid/lid.176.ftz"))),
            "gopher_repetition": GopherRepetition(GopherRepetitionConfig()),
            "gopher_quality": GopherQuality(GopherQualityConfig()),
            "c4": C4Filter(C4FilterConfig()), "fineweb": FineWebFilter(FineWebFilterConfig())}


class NumpyScores:
    """fasttext-predict returns scores as floats; datatrove expects fastText's numpy array."""

    def __init__(self, model):
        self.model = model

    def predict(self, text: str, k: int = 1):
        labels, scores = self.model.predict(text, k=k)
        return labels, np.asarray(scores)


def datatrove_language_filter(data: Path):
    """datatrove's LanguageFilter on the same local lid.176.ftz (offline), loaded on first use so
    that datatrove's executor can deep-copy the step."""
    from datatrove.pipeline.filters import LanguageFilter as DTLanguageFilter
    from datatrove.utils.hashes import xxhash as dt_xxhash
    from datatrove.utils.lid import FT176LID
    from fasttext.FastText import _FastText
    import xxhash

    # datatrove asks for the `fasttext-numpy2-wheel` distribution; the venv's fasttext-predict
    # provides the same `fasttext` module and model class, so skip that distribution check.
    DTLanguageFilter._requires_dependencies = ["fasteners"]
    # The installed xxhash refuses str, which datatrove passes; encode as older xxhash did.
    dt_xxhash.xxhash64 = lambda data: xxhash.xxh64_intdigest(data.encode() if isinstance(data, str) else data)
    model_path = str(data / "langid/lid.176.ftz")

    class LocalFT176(FT176LID):
        @property
        def model(self):
            if self._model is None:
                self._model = NumpyScores(_FastText(model_path))
            return self._model

    language = DTLanguageFilter(languages=["en"], language_threshold=0.65)
    language.model = LocalFT176(["en"])
    return language


def datatrove_steps(data: Path, sig_dir: str) -> tuple[dict, object]:
    from datatrove.pipeline.dedup.minhash import MinhashConfig, MinhashDedupSignature
    from datatrove.pipeline.filters import (C4QualityFilter, FineWebQualityFilter, GopherQualityFilter,
                                            GopherRepetitionFilter)

    steps = {"language": datatrove_language_filter(data), "gopher_repetition": GopherRepetitionFilter(),
             "gopher_quality": GopherQualityFilter(), "c4": C4QualityFilter(), "fineweb": FineWebQualityFilter()}
    return steps, MinhashDedupSignature(output_folder=sig_dir, config=MinhashConfig(n_grams=5, num_buckets=14,
                                                                                   hashes_per_bucket=8))


def dt_doc(doc: Document):
    from datatrove.data import Document as DTDocument
    return DTDocument(text=doc.text, id=doc.id, metadata={})


def our_decision(step, doc: Document) -> bool:
    return step.process(Document(id=doc.id, text=doc.text, source=doc.source, key=0), StepStats()) is not None


def dt_decision(step, doc: Document) -> bool:
    result = step.filter(dt_doc(doc))
    return bool(result[0] if isinstance(result, tuple) else result)


@dataclass
class Timing:
    docs: int
    megabytes: float
    cpu_s: float
    wall_s: float

    def as_dict(self) -> dict:
        return {"docs": self.docs, "MB": round(self.megabytes, 2), "cpu_s": round(self.cpu_s, 2),
                "wall_s": round(self.wall_s, 2), "docs_per_cpu_s": round(self.docs / self.cpu_s, 1),
                "MB_per_cpu_s": round(self.megabytes / self.cpu_s, 3)}


def timed(fn, docs: list[Document]) -> Timing:
    cpu, wall = time.process_time(), time.perf_counter()
    fn()
    return Timing(len(docs), sum(len(d.text.encode()) for d in docs) / 1e6,
                  time.process_time() - cpu, time.perf_counter() - wall)


def run_ours(docs: list[Document], steps: dict) -> None:
    hasher = MinHasher()
    for doc in run_steps((Document(id=d.id, text=d.text, source=d.source, key=0) for d in docs), list(steps.values()), {}):
        hasher.signature(doc.text)


def run_datatrove(docs: list[Document], steps: dict, minhash) -> None:
    pipeline = (dt_doc(d) for d in docs)
    for step in steps.values():
        pipeline = step.run(pipeline)
    minhash.run(pipeline)  # consumes the documents, writes signatures; yields nothing


def agreement(docs: list[Document], ours: dict, theirs: dict) -> dict:
    result = {}
    for rule in RULES:
        same = sum(our_decision(ours[rule], d) == dt_decision(theirs[rule], d) for d in docs)
        kept = sum(our_decision(ours[rule], d) for d in docs)
        result[rule] = {"same_decision": round(same / len(docs), 4), "kept_by_ours": kept}
    return result


def tokenizer_bench(data: Path, docs: list[Document]) -> dict:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    gpt2 = data / "tokenizer/gpt2"
    hf = Tokenizer(models.BPE.from_file(str(gpt2 / "encoder.json"), str(gpt2 / "vocab.bpe")))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    tk = load_encoding(str(gpt2 / "r50k_base.tiktoken"))
    texts = [d.text for d in docs]
    ours = timed(lambda: [tk.encode_ordinary(t) for t in texts], docs)
    theirs = timed(lambda: [hf.encode(t).ids for t in texts], docs)
    same = sum(tk.encode_ordinary(t) == hf.encode(t).ids for t in texts[:500]) / min(500, len(texts))
    return {"tiktoken": ours.as_dict(), "hf_tokenizers": theirs.as_dict(), "same_ids_first_500_docs": same}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    data = Path(args.data)
    docs = load_documents(data)
    ours = our_steps(data)
    with tempfile.TemporaryDirectory() as sig_dir:
        theirs, minhash = datatrove_steps(data, sig_dir)
        run_datatrove(docs[:50], theirs, minhash)  # warm-up: spaCy and the model load lazily
        dt_time = timed(lambda: run_datatrove(docs, theirs, minhash), docs)
    our_time = timed(lambda: run_ours(docs, ours), docs)
    figures = {"documents": len(docs), "MB": round(sum(len(d.text.encode()) for d in docs) / 1e6, 2),
               "chain": {"ours": our_time.as_dict(), "datatrove": dt_time.as_dict(),
                         "speedup_docs_per_cpu_s": round(dt_time.cpu_s / our_time.cpu_s, 2)},
               "agreement": agreement(docs, ours, theirs), "tokenization": tokenizer_bench(data, docs)}
    print(json.dumps(figures, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1) + "\n")


if __name__ == "__main__":
    main()
