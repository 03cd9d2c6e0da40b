"""Text helpers shared by filters, dedup and decontamination. The word splitter separates
punctuation from words the way spaCy's English tokenizer does for the common cases, which
the Gopher/FineWeb rules were tuned with, at regex speed."""
from __future__ import annotations

import re
import unicodedata

# Abbreviations spaCy keeps whole (its English tokenizer exceptions; the common ones).
ABBREVIATIONS = "Mr|Mrs|Ms|Dr|St|Jr|Sr|Prof|vs|Mt|Gen|Col|Capt|Lt|Rev|Sgt|Gov|Jan|Feb|Mar|Apr|Jun|Jul|Aug|Sep|Sept|Oct|Nov|Dec|Inc|Ltd"
# Combining marks (Mn/Mc/Me, e.g. Devanagari vowel signs) belong to their word, as for spaCy; \w lacks them.
MARKS = "".join(re.escape(chr(c)) for c in range(0x300, 0x10000) if unicodedata.category(chr(c)).startswith("M"))
WORD_PART = rf"(?:[^\W_]|[{MARKS}])+(?:[.,:]\d+)*"  # letters/digits (an underscore is punctuation); 3.5, 1,000, Ge1:1 whole
PRONOUN = r"\b(?:I|[Yy]ou|[Ww]e|[Tt]hey|[Hh]e|[Ss]he|[Ii]t)(?='(?:re|ve|ll|d|m)\b)"
WORD_RE = re.compile(
    rf"\b(?:{ABBREVIATIONS})\.|\b(?:[A-Za-z]\.){{2,}}|\b[A-Z]\.(?=\s)|"
    # spaCy splits "--" only between letters; "answer!--nothing", "Miss--" stay whole
    r"(?<!\S)(?=--|\S*(?:[^A-Za-z\s-]--|--[^A-Za-z\s-]|--(?!\S)))\S+|"
    rf"-{{2,}}|\.{{2,}}|[nN]'[tT]\b|'[sS]\b|{PRONOUN}|'(?:re|ve|ll|d|m)\b|\b[Cc]an(?=not\b)|"
    rf"{WORD_PART}(?=[nN]'[tT]\b)|{WORD_PART}(?:'(?![sS]\b)[^\W_]+)*|[^\w\s]|_")
SENTENCE_END_RE = re.compile(r"[.!?]+[\"')\]]*(?=\s+\S)")
# spaCy keeps abbreviations and single-letter initials ("Mr.", "e.g.", "J.") whole: no sentence ends there.
NON_SENTENCE_END_RE = re.compile(rf"(?<![^\s\"'(\[])(?:{ABBREVIATIONS}|(?:[A-Za-z]\.)*[A-Za-z])\.(?=\s+\S)")
NORMALIZE_DROP_RE = re.compile(r"[^\w\s]")
DIGITS_RE = re.compile(r"\d+")
SPACES_RE = re.compile(r"\s+")
COMBINING_MARKS_RE = re.compile(r"[\u0300-\u036f\u1ab0-\u1aff\u1dc0-\u1dff\u20d0-\u20ff\ufe20-\ufe2f]")


def split_words(text: str) -> list[str]:
    return WORD_RE.findall(text)


def count_sentences(line: str) -> int:
    """Sentence ends followed by more text, plus the trailing sentence."""
    ends = len(SENTENCE_END_RE.findall(line)) - len(NON_SENTENCE_END_RE.findall(line))
    return ends + (1 if line.strip() else 0)


def normalize_for_dedup(text: str) -> str:
    """Lowercase, strip accents and punctuation, numbers to 0, whitespace collapsed: two copies
    of a page that differ only in these still hash the same."""
    text = text.lower()
    if not text.isascii():
        text = COMBINING_MARKS_RE.sub("", unicodedata.normalize("NFKD", text))
    text = DIGITS_RE.sub("0", NORMALIZE_DROP_RE.sub(" ", text))
    return SPACES_RE.sub(" ", text).strip()
