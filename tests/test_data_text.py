"""Text data helpers: WordNet line parsing, tokenizer training, packing, hold-out split."""

import torch

from colabridge.data.text import (
    SPECIAL_TOKENS,
    encode_texts,
    pack_sentences,
    pad_rows,
    parse_wordnet_line,
    sentence_case,
    split_holdout,
    train_tokenizer,
)
from colabridge.pipelines.prompting import pad_to_blocks

TEXTS = ["the cat sat on the mat", "a dog ran in the park", "the old house stood on the hill"] * 20


def test_parse_wordnet_line_splits_definitions_and_examples():
    line = ('00016573 29 v 01 nod 2 001 @ 00016380 v 0000 02 + 01 00 | be almost asleep; fall asleep; '
            '"The old man sat nodding; smiling" ; "he nodded"  \n')
    defs, exs = parse_wordnet_line(line)
    assert defs == ["be almost asleep", "fall asleep"]
    assert exs == ["The old man sat nodding; smiling", "he nodded"]
    assert parse_wordnet_line("  1 This software and database is being provided | x") == ([], [])


def test_sentence_case():
    assert sentence_case("a small dog") == "A small dog."
    assert sentence_case("Is it?") == "Is it?"


def test_tokenizer_has_special_tokens_and_round_trips():
    tok = train_tokenizer(TEXTS, vocab_size=300, min_frequency=1)
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3]
    ids = tok.encode("the old cat").ids
    assert tok.decode(ids) == "the old cat"


def test_pack_sentences_keeps_sentences_whole_and_pads():
    rows, real = pack_sentences([[5, 6, 7], [8, 9], [10, 11, 12, 13, 14, 15, 16, 17]], seq_len=6, eos_id=0, pad_id=3)
    assert rows.tolist() == [[5, 6, 7, 0, 3, 3], [8, 9, 0, 3, 3, 3], [10, 11, 12, 13, 14, 0]]
    assert real.tolist()[0] == [True] * 4 + [False] * 2
    assert real.sum() == (rows != 3).sum()


def test_pad_rows_right_pads_and_marks_real_tokens():
    ids, real = pad_rows([[5, 6], [], [7, 8, 9]], width=4, pad_id=3)
    assert ids.tolist() == [[5, 6, 3, 3], [3, 3, 3, 3], [7, 8, 9, 3]]
    assert real.tolist() == [[True, True, False, False], [False] * 4, [True, True, True, False]]


def test_pad_to_blocks_pads_within_blocks_as_input_and_batch_tail_as_masked():
    ids, mask = pad_to_blocks([[5, 6, 7], [8], [9, 10, 11, 12, 13]], block_size=2, pad_id=3)
    assert ids.tolist() == [[5, 6, 7, 3, 3, 3], [8, 3, 3, 3, 3, 3], [9, 10, 11, 12, 13, 3]]
    assert mask.tolist() == [[True] * 4 + [False] * 2, [True] * 2 + [False] * 4, [True] * 6]


def test_split_holdout_is_deterministic_and_disjoint():
    texts = [f"sentence {i}" for i in range(1000)]
    train, held = split_holdout(texts, 0.1)
    assert (train, held) == split_holdout(texts, 0.1)
    assert not set(train) & set(held) and len(train) + len(held) == 1000
    assert 50 < len(held) < 150


def test_encode_texts_matches_single_encode():
    tok = train_tokenizer(TEXTS, vocab_size=300, min_frequency=1)
    assert encode_texts(tok, TEXTS[:2]) == [tok.encode(t).ids for t in TEXTS[:2]]
    assert isinstance(torch.tensor(encode_texts(tok, TEXTS[:1])), torch.Tensor)


def test_split_sentences_keeps_titles_attached():
    from colabridge.data.text import split_sentences

    text = "It is a truth universally acknowledged. Mr. Bennet replied that he had not! Why? She laughed at it all."
    assert split_sentences(text, min_chars=5) == [
        "It is a truth universally acknowledged.", "Mr. Bennet replied that he had not!", "She laughed at it all."]
