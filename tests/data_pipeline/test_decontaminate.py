"""GPT-3's decontamination (Brown et al. 2020, App. C), each rule at its boundary: a colliding 13-gram
goes with 200 characters each side, the document splits there, pieces under 200 characters go, and a
document split into more than 10 pieces goes whole."""
import json

import pytest

from data_pipeline.decontaminate import Decontaminate, DecontaminationConfig
from data_pipeline.document import Document, StepStats

QUESTION = "Which planet in our solar system has the most moons orbiting around it as of the latest count"
WORDS = QUESTION.split()


def step(tmp_path, **kw) -> Decontaminate:
    (tmp_path / "trivia.jsonl").write_text(json.dumps({"text": QUESTION}) + "\n")
    return Decontaminate(DecontaminationConfig(eval_sets=[str(tmp_path / "trivia.jsonl")], **kw))


def run(f: Decontaminate, *texts: str) -> tuple[list[Document], StepStats]:
    stats = StepStats()
    docs = [Document(id=f"d{i}", text=t, source="web", key=i << 8) for i, t in enumerate(texts)]
    return list(f.run(docs, stats)), stats


def filler(n: int, letter: str = "x") -> str:
    """n characters of words that share none with the question, starting and ending with a space."""
    return " " + ((letter * 9 + " ") * (n // 10 + 1))[:n - 2] + " "


GRAM = " ".join(WORDS[:13])


def test_the_colliding_13_gram_goes_with_200_characters_each_side(tmp_path):
    before, after = filler(500, "a"), filler(450, "b")
    out, stats = run(step(tmp_path), before + GRAM + after)
    assert [d.text for d in out] == [before[:-200], after[200:]]  # split where the text was removed
    assert [d.id for d in out] == ["d0#0", "d0#1"] and out[1].key == out[0].key + 1
    assert stats.notes["cut_trivia"] == 1 and stats.notes["ngrams_trivia"] == 1
    assert stats.docs_in + stats.notes["split_pieces"] == stats.docs_out + sum(stats.removed.values())


def test_twelve_shared_words_are_not_a_collision(tmp_path):
    text = filler(300) + " ".join(WORDS[:12]) + filler(300)
    out, stats = run(step(tmp_path), text)
    assert [d.text for d in out] == [text] and not stats.notes


@pytest.mark.parametrize("length,kept", [(199, False), (200, True)])
def test_pieces_shorter_than_200_characters_are_dropped(tmp_path, length, kept):
    tail = filler(length, "c")
    out, stats = run(step(tmp_path), filler(800, "a") + GRAM + filler(200, "b") + tail)
    assert [d.text for d in out] == [filler(800, "a")[:-200]] + ([tail] if kept else [])


def test_a_document_left_with_only_short_pieces_is_dropped(tmp_path):
    out, stats = run(step(tmp_path), filler(300) + GRAM + filler(300))
    assert out == [] and stats.removed == {"decontaminate:trivia_short": 1}


@pytest.mark.parametrize("collisions,dropped", [(9, False), (10, True)])
def test_a_document_split_into_more_than_10_pieces_is_dropped_whole(tmp_path, collisions, dropped):
    """k collisions with 600 characters around each leave k + 1 pieces of 200 characters."""
    out, stats = run(step(tmp_path), filler(600) + filler(600).join([GRAM] * collisions) + filler(600))
    assert stats.notes["ngrams_trivia"] == collisions
    if dropped:
        assert out == [] and stats.removed == {"decontaminate:trivia": 1}
    else:
        assert len(out) == collisions + 1 and all(len(d.text) >= 200 for d in out)


def test_whole_document_mode_drops_every_colliding_document(tmp_path):
    out, stats = run(step(tmp_path, mode="drop"), filler(900) + GRAM + filler(900), filler(100))
    assert [d.id for d in out] == ["d1"] and stats.removed == {"decontaminate:trivia": 1}


def test_the_report_counts_cut_and_dropped_documents_and_colliding_13_grams_per_eval_set(tmp_path):
    from data_pipeline.report import build_report

    f = step(tmp_path)
    _, stats = run(f, filler(600) + GRAM + filler(600), filler(300) + GRAM + " " + GRAM + filler(300), filler(50))
    result = {"index": 0, "source": "web", "path": "x.warc", "seconds": 0.1, "error": None,
              "stats": {"decontaminate": stats.to_json()}}
    report = build_report([result], {}, {}, [], 1.0)
    assert report["decontamination"] == {"trivia": {"cut": 1, "dropped": 1, "ngrams": 3}}  # 1 + 2
