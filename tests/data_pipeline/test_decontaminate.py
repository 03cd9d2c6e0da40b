import json

from data_pipeline.decontaminate import Decontaminate
from data_pipeline.document import Document

QUESTION = "Which planet in our solar system has the most moons orbiting around it as of the latest count"


def test_documents_sharing_a_13_gram_with_an_eval_set_are_removed(tmp_path):
    (tmp_path / "trivia.jsonl").write_text(json.dumps({"text": QUESTION}) + "\n")
    f = Decontaminate([str(tmp_path / "trivia.jsonl")], "text", 13)
    leaked = Document(id="a", text="Blog post. " + QUESTION.lower() + "? Saturn, says NASA.", source="web", key=0)
    twelve = " ".join(QUESTION.split()[:12])
    clean = Document(id="b", text=f"Only twelve words overlap: {twelve}. Then it changes.", source="web", key=1)
    assert f.reason(leaked) == "overlaps_trivia"
    assert f.reason(clean) is None
