"""Data: text corpora and packing (:mod:`.text`)."""
