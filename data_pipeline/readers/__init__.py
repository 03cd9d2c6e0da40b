"""Readers turn one input file into documents; each counts what it could not parse."""
from data_pipeline.readers.text import read_books, read_jsonl, read_wiki
from data_pipeline.readers.web import read_warc, read_wat, read_wet

READERS = {"warc": read_warc, "wet": read_wet, "wat": read_wat,
           "wiki": read_wiki, "books": read_books, "jsonl": read_jsonl}
