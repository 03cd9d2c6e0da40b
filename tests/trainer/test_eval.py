import math
import random

import pytest

from tests.trainer.conftest import REPO
from trainer.eval import addition_examples, evaluate, next_word_examples


def test_tasks_are_generated_locally():
    add = addition_examples(random.Random(0), 5)
    prompt, answer = add[0]
    a, b = map(int, prompt.removeprefix("Q: What is ").removesuffix("? A:").split(" plus "))
    assert 10 <= a <= 99 and 10 <= b <= 99 and answer == f" {a + b}"
    words = next_word_examples("It was a truth universally acknowledged by all of them. Short one.", random.Random(0), 5)
    assert words == [("It was a truth universally acknowledged by all of", " them")]


def test_eval_reports_heldout_perplexity_and_accuracy_per_shot_count(dense_run, shared_data):
    tokenizer = str(shared_data / "tokenizer" / "gpt2" / "r50k_base.tiktoken")
    result = evaluate(dense_run, tokenizer, max_batches=4, n_examples=6, shots=(0, 1, 3))
    assert math.isclose(result["heldout_perplexity"], math.exp(result["heldout_loss"]))
    assert result["heldout_loss"] < 10.0 and result["heldout_tokens"] == 4 * 4 * 32
    for task in ("addition_2digit", "next_word"):
        accs = result["few_shot"][task]
        assert set(accs) == {"0-shot", "1-shot", "3-shot"} and all(0.0 <= v <= 1.0 for v in accs.values())
    assert result["few_shot_examples"]["next_word"] > 0


def test_eval_numbers_do_not_depend_on_the_batch_size(dense_run, shared_data):
    """--max-batches counts the run's micro-batches; --batch-size only regroups the same windows and examples."""
    tokenizer = str(shared_data / "tokenizer" / "gpt2" / "r50k_base.tiktoken")
    one, many = (evaluate(dense_run, tokenizer, max_batches=3, n_examples=6, shots=(0, 3), batch_size=b, device="cpu")
                 for b in (1, 16))
    assert one["heldout_tokens"] == many["heldout_tokens"] == 3 * 4 * 32
    assert one["heldout_loss"] == pytest.approx(many["heldout_loss"], rel=1e-6)
    assert one["few_shot"] == many["few_shot"]
