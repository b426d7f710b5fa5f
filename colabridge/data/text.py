"""Text corpora, tokenizer training and block packing for the Cola trainers.

* :func:`read_wordnet` — WordNet 3.0 glosses and example sentences from the Debian package
  ``wordnet-base`` (``/usr/share/wordnet/data.{noun,verb,adj,adv}``; WordNet 3.0 licence, BSD-like,
  keep its notice when redistributing derived data).
* :func:`train_tokenizer` — a byte-level BPE with ``tokenizers`` and the special tokens the pipeline
  expects (:data:`SPECIAL_TOKENS`).
* :func:`pack_sentences` — each sentence followed by ``<|endoftext|>``, whole sentences greedily packed
  into fixed-length rows, the rest padded with ``<|pad|>`` (:func:`pad_rows`, also used for prompts).
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Iterable

import torch

EOS, IM_START, IM_END, PAD = "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"
SPECIAL_TOKENS = [EOS, IM_START, IM_END, PAD]
WORDNET_ROOT = Path("/usr/share/wordnet")
WORDNET_FILES = ("data.noun", "data.verb", "data.adj", "data.adv")
_QUOTED = re.compile(r'"([^"]*)"')
_TERMINAL = (".", "!", "?", '"', "'")


def sentence_case(text: str) -> str:
    """Capitalise the first letter and end with a full stop unless the text already ends a sentence."""
    text = text.strip()
    if not text:
        return text
    text = text[0].upper() + text[1:]
    return text if text.endswith(_TERMINAL) else text + "."


def parse_wordnet_line(line: str) -> tuple[list[str], list[str]]:
    """``(definitions, examples)`` of one ``data.*`` synset line (text after ``' | '``)."""
    if line.startswith("  ") or " | " not in line:  # licence header lines start with two spaces
        return [], []
    gloss = line.split(" | ", 1)[1].strip()
    examples = [e.strip() for e in _QUOTED.findall(gloss) if e.strip()]
    rest = _QUOTED.sub("", gloss)
    definitions = [d.strip(" ,") for d in rest.split(";") if d.strip(" ,")]
    return definitions, examples


def read_wordnet(root: str | Path = WORDNET_ROOT, examples: bool = True, definitions: bool = True,
                 normalise: bool = True) -> list[str]:
    """Unique WordNet sentences, in file order; ``normalise`` applies :func:`sentence_case`.

    Raises ``FileNotFoundError`` with the install command when the package is missing.
    """
    root = Path(root)
    files = [root / name for name in WORDNET_FILES]
    if not all(f.is_file() for f in files):
        raise FileNotFoundError(f"WordNet data not found under {root}; install it with `apt-get install -y wordnet-base`.")
    seen, out = set(), []
    for path in files:
        with open(path, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                defs, exs = parse_wordnet_line(line)
                for text in (defs if definitions else []) + (exs if examples else []):
                    text = sentence_case(text) if normalise else text
                    if text and text not in seen:
                        seen.add(text)
                        out.append(text)
    return out


_ABBREVIATIONS = ("Mr.", "Mrs.", "Dr.", "St.", "Ms.", "Col.", "Capt.")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def split_sentences(text: str, min_chars: int = 20, max_chars: int = 200) -> list[str]:
    """Split running prose at ``. ! ?`` (not after Mr./Mrs./…); keep sentences of a sane length."""
    pieces, out = _SENTENCE_END.split(text), []
    buffer = ""
    for piece in pieces:
        buffer = f"{buffer} {piece}".strip()
        if not buffer.endswith(_ABBREVIATIONS):
            out.append(buffer)
            buffer = ""
    return [s for s in out if min_chars <= len(s) <= max_chars and not s.isupper()]


def read_janeaustenr(extracted_root: str | Path, book: str = "prideprejudice") -> list[str]:
    """Sentences of one Austen novel from the Debian package ``r-cran-janeaustenr`` (MIT; texts public
    domain), unpacked without installing R: ``apt-get download r-cran-janeaustenr && dpkg-deb -x
    r-cran-janeaustenr_*.deb ROOT``. Needs ``pip install rdata``. Chapter headings are dropped."""
    import gzip
    import zlib

    import rdata

    data = Path(extracted_root) / "usr/lib/R/site-library/janeaustenr/data"
    index = rdata.conversion.convert(rdata.parser.parse_data(gzip.open(data / "Rdata.rdx").read()))
    if book not in index["variables"]:
        raise ValueError(f"book={book!r}: choose one of {sorted(index['variables'])}.")
    offset, length = (int(v) for v in index["variables"][book])
    blob = (data / "Rdata.rdb").read_bytes()[offset : offset + length]  # 4-byte length + zlib stream
    lines = rdata.conversion.convert(rdata.parser.parse_data(zlib.decompress(blob[4:])))
    prose = " ".join((line or "").strip() for line in lines if not (line or "").strip().upper().startswith("CHAPTER"))
    return split_sentences(prose)


def read_lines(path: str | Path) -> list[str]:
    """Non-empty stripped lines of a UTF-8 text file."""
    return [s.strip() for s in Path(path).read_text(encoding="utf-8").splitlines() if s.strip()]


def split_holdout(texts: list[str], fraction: float, salt: str = "colabridge") -> tuple[list[str], list[str]]:
    """Deterministic ``(train, heldout)`` split by a hash of each text (stable across runs and machines)."""
    if not 0 <= fraction < 1:
        raise ValueError(f"holdout fraction={fraction} must be in [0, 1).")
    train, held = [], []
    threshold = int(fraction * 2**32)
    for text in texts:
        h = int.from_bytes(hashlib.blake2b((salt + text).encode(), digest_size=4).digest(), "big")
        (held if h < threshold else train).append(text)
    return train, held


def train_tokenizer(texts: Iterable[str], vocab_size: int = 4096, min_frequency: int = 2):
    """A byte-level BPE ``tokenizers.Tokenizer`` with :data:`SPECIAL_TOKENS` (ids 0…3).

    No BOS/EOS post-processor: ``encode(text).ids`` are the text's own tokens, as the pipeline expects.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def pack_sentences(token_lists: Iterable[list[int]], seq_len: int, eos_id: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack ``sentence + [eos]`` greedily into rows of ``seq_len``; returns ``(ids, real)`` ``(N, seq_len)``.

    A sentence never straddles rows; one longer than a row is cut to ``seq_len − 1`` tokens + eos.
    ``real`` is False on the ``pad_id`` tail of each row.
    """
    rows, current = [], []
    for ids in token_lists:
        piece = list(ids)[: seq_len - 1] + [eos_id]
        if len(current) + len(piece) > seq_len:
            rows.append(current)
            current = []
        current = current + piece
    if current:
        rows.append(current)
    return pad_rows(rows, seq_len, pad_id)


def pad_rows(rows: list[list[int]], width: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad each row of token ids to ``width`` with ``pad_id``; returns ``(ids, real)`` ``(N, width)``.

    ``real`` is True on each row's own tokens and False on the padding. Shared by training-row packing
    (:func:`pack_sentences`) and prompt batching (:func:`colabridge.pipelines.prompting.pad_to_blocks`).
    """
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # (N, width)
    real = torch.zeros(len(rows), width, dtype=torch.bool)  # (N, width)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        real[i, : len(row)] = True
    return ids, real


def encode_texts(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text with a ``tokenizers.Tokenizer`` (batched)."""
    return [e.ids for e in tokenizer.encode_batch(texts)]
