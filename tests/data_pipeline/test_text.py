"""Word and sentence splitting that the Gopher, C4 and FineWeb rules count with (spaCy's behaviour)."""
from data_pipeline.text import count_sentences, split_words


def test_abbreviations_and_initials_end_no_sentence():
    assert count_sentences("Mr. Elton met J. D. Unwin and P. c. cristatus, e.g. here. He left.") == 2
    assert count_sentences("No. 5 is here. Fine.") == 3


def test_combining_marks_stay_in_their_word():
    assert split_words("परीक्षा (பரிட்சை) naïve") == ["परीक्षा", "(", "பரிட்சை", ")", "naïve"]
