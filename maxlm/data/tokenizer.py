"""Sentencepiece BPE tokenizer: training from text files and a thin loading wrapper.

The tokenizer is tuned for source code and prose that must round-trip exactly (`decode(encode(text)) == text`):
no Unicode normalisation, whitespace kept as-is (runs of spaces become whitespace-only pieces, so indentation is
cheap), no dummy leading space, newline and tab as atomic pieces, and byte fallback so no character is ever `unk`.
The one known exception is U+2581 ("▁"), which sentencepiece itself uses to spell a space: a literal "▁" in the
input decodes to " ".

Special ids are fixed so that every model and data pipeline in maxlm can rely on them without reading the model:
pad=0 (also the padding id of packed batches), unk=1, bos=2, eos=3.
"""

from __future__ import annotations

import io
import logging
import os
import random
import re
import time
from collections.abc import Iterator, Sequence

import numpy as np
import sentencepiece as spm

from maxlm.config import ConfigError, expand_globs
from maxlm.config.paths import writable_file

log = logging.getLogger(__name__)

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
# ChatML's turn markers, trained as single pieces (user-defined symbols, matched in any text) so that a chat
# template renders conversations the model can be fine-tuned on and generation can stop at the end of a turn.
CHAT_SPECIAL_TOKENS = ("<|im_start|>", "<|im_end|>")

# Sentencepiece drops training "sentences" longer than `max_sentence_length` bytes, so files are fed as blocks of
# whole lines of at most this many characters (a UTF-8 character is at most 4 bytes, hence the limit below).
_BLOCK_CHARS = 4096
_MAX_SENTENCE_BYTES = 4 * _BLOCK_CHARS


class Tokenizer:
    """A sentencepiece model behind the four calls the rest of maxlm needs.

    It pickles as the serialized model (not a path), so grain worker processes get a working copy even when the
    model file lives on a disk they cannot see.
    """

    def __init__(self, model_proto: bytes, path: str = "") -> None:
        self.path = path
        self._proto = model_proto
        self._sp = spm.SentencePieceProcessor(model_proto=model_proto)

    @property
    def vocab_size(self) -> int:
        return int(self._sp.vocab_size())

    @property
    def bos_id(self) -> int:
        return int(self._sp.bos_id())

    @property
    def eos_id(self) -> int:
        return int(self._sp.eos_id())

    @property
    def pad_id(self) -> int:
        return int(self._sp.pad_id())

    def encode(self, text: str) -> list[int]:
        """Token ids without bos/eos: the data pipeline decides where document markers go."""
        return self._sp.encode(text)

    def token_id(self, token: str) -> int | None:
        """The id of a whole piece (e.g. "<|im_end|>"), or None when the vocabulary lacks it."""
        i = int(self._sp.piece_to_id(token))
        return i if self._sp.id_to_piece(i) == token else None

    @property
    def special_tokens(self) -> dict[str, str]:
        """What a chat template sees as `bos_token`/`eos_token`: the control pieces, which `encode_with_offsets`
        turns back into their ids (plain `encode` treats them as text)."""
        return {"bos_token": self._sp.id_to_piece(self.bos_id), "eos_token": self._sp.id_to_piece(self.eos_id)}

    @property
    def chat_template(self) -> str | None:
        return None  # a sentencepiece model carries no template: data.chat_template picks one

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids of `text` with each token's [start, end) character span; the bos/eos control pieces written as text
        (by a chat template's `{{ bos_token }}`) become their ids, as a Hugging Face tokenizer's special tokens do.

        Sentencepiece reports byte offsets, and byte-fallback pieces of one character all but the last report an
        empty span; both are mapped to characters here (an empty span takes the character its bytes belong to).
        """
        specials = {self._sp.id_to_piece(i): i for i in (self.bos_id, self.eos_id)}
        ids: list[int] = []
        offsets: list[tuple[int, int]] = []
        pos = 0
        for part in re.split("(" + "|".join(map(re.escape, specials)) + ")", text):
            if part in specials:
                ids.append(specials[part])
                offsets.append((pos, pos + len(part)))
            elif part:
                raw = part.encode("utf-8")
                # char index of every byte position (and one past the end)
                char_at = [0] * (len(raw) + 1)
                c = 0
                for b, byte in enumerate(raw):
                    if b and (byte & 0xC0) != 0x80:
                        c += 1
                    char_at[b] = c
                char_at[len(raw)] = len(part)
                for piece in self._sp.encode(part, return_type="proto").pieces:
                    start = char_at[piece.begin]
                    end = char_at[piece.end] if piece.end > piece.begin else start + 1
                    ids.append(int(piece.id))
                    offsets.append((pos + start, pos + end))
            pos += len(part)
        return ids, offsets

    def decode(self, ids: Sequence[int]) -> str:
        # Sentencepiece rejects numpy integers and ids outside the vocabulary would raise deep in C++; callers often
        # hold model outputs as numpy arrays, so normalise here.
        return self._sp.decode([int(i) for i in ids])

    def id_to_piece(self, i: int) -> str:
        return self._sp.id_to_piece(int(i))

    def token_bytes(self) -> np.ndarray:
        """UTF-8 bytes that each id stands for, as an int32 array of length vocab_size.

        Bits per byte needs the byte count of the text behind the evaluated tokens; summing this table over token
        ids gives it exactly for any span (a whole document, a packed chunk) without decoding: a byte-fallback piece
        is one byte, a normal piece is its text with U+2581 read as a space, and pad/unk/bos/eos are zero.
        """
        table = np.zeros(self.vocab_size, np.int32)
        for i in range(self.vocab_size):
            if self._sp.is_control(i) or self._sp.is_unknown(i):
                continue
            table[i] = 1 if self._sp.is_byte(i) else len(self._sp.id_to_piece(i).replace("\u2581", " ").encode())
        return table

    def __getstate__(self) -> dict[str, object]:
        return {"path": self.path, "proto": self._proto}

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__init__(state["proto"], state["path"])  # type: ignore[misc, arg-type]

    def __repr__(self) -> str:
        return f"Tokenizer(path={self.path!r}, vocab_size={self.vocab_size})"


def load_tokenizer(path: str) -> Tokenizer:
    """Loads a `.model` file written by `train_tokenizer` (or any sentencepiece model)."""
    if not os.path.isfile(path):
        raise ConfigError(f"tokenizer model not found: {path}; train one with `maxlm tokenizer train`")
    with open(path, "rb") as f:
        proto = f.read()
    try:
        return Tokenizer(proto, path)
    except RuntimeError as e:
        raise ConfigError(f"{path}: not a sentencepiece model ({_short_spm_error(e)})") from None


def _short_spm_error(e: Exception) -> str:
    """Sentencepiece errors carry a C++ source location prefix that means nothing to a user; keep the reason."""
    msg = str(e).strip()
    return msg.split("] ", 1)[-1] if "] " in msg else msg


def _read_sample(files: list[str], max_bytes: int, seed: int) -> tuple[list[str], int]:
    """Texts of a deterministic random sample of `files`, about `max_bytes` characters in all, and the count of
    files skipped as unreadable or non-UTF-8.

    Sampling whole files in a seeded shuffle of the sorted list (rather than the first N) keeps the vocabulary
    representative of the corpus and independent of filesystem order; only the last file read may be truncated.
    """
    order = sorted(files)
    random.Random(seed).shuffle(order)
    texts: list[str] = []
    skipped, total = 0, 0
    for path in order:
        if total >= max_bytes:
            break
        try:
            with open(path, "rb") as f:
                text = f.read().decode("utf-8")
        except UnicodeDecodeError:
            skipped += 1
            continue
        except OSError as e:
            log.warning("tokenizer: cannot read %s (%s); skipping it", path, e.strerror)
            skipped += 1
            continue
        text = text[: max_bytes - total]
        if text:
            texts.append(text)
            total += len(text)
    return texts, skipped


def _blocks(texts: list[str]) -> Iterator[str]:
    """Yields each text as blocks of whole lines (newlines kept) that sentencepiece will not drop as too long.

    Keeping newlines inside the training sentences lets the trainer see "\n" followed by indentation, the most
    common context in code.
    """
    for text in texts:
        buf: list[str] = []
        size = 0
        for line in text.splitlines(keepends=True):
            while len(line) > _BLOCK_CHARS:  # a pathological single line (minified data): cut it
                yield line[:_BLOCK_CHARS]
                line = line[_BLOCK_CHARS:]
            if size + len(line) > _BLOCK_CHARS and buf:
                yield "".join(buf)
                buf, size = [], 0
            buf.append(line)
            size += len(line)
        if buf:
            yield "".join(buf)


def train_tokenizer(input_glob: str, vocab_size: int, out: str, *, max_bytes: int = 20_000_000,
                    seed: int = 0) -> str:
    """Trains a byte-fallback BPE model on the files matching `input_glob` and writes it to `out`.

    Training runs in memory from a deterministic sample of at most `max_bytes` characters, so the same inputs
    and seed always produce the same model bytes. `vocab_size` is an upper bound: on a corpus too small to
    support that many merges the model is smaller (the data pipeline only needs tokenizer vocab <= model vocab).
    Returns `out`.
    """
    files = expand_globs(input_glob)
    if not files:
        raise ConfigError(f"tokenizer input: no files match {input_glob!r}; check the path or glob")
    if vocab_size <= 0:
        raise ConfigError(f"tokenizer vocab_size must be positive, got {vocab_size}")
    out = writable_file(out, "--out")  # before minutes of training, not after
    start = time.perf_counter()
    texts, skipped = _read_sample(files, max_bytes, seed)
    if skipped:
        log.warning("tokenizer: skipped %d unreadable or non-UTF-8 file(s) under %r", skipped, input_glob)
    if not any(t.strip() for t in texts):
        raise ConfigError(f"tokenizer input: {input_glob!r} matched {len(files)} file(s) but no UTF-8 text in them")

    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_blocks(texts),
            model_writer=model,
            model_type="bpe",
            vocab_size=vocab_size,
            hard_vocab_limit=False,
            # Rare characters (in code: non-ASCII in strings/comments) fall back to bytes instead of taking
            # vocabulary slots: full coverage of the stdlib needs more than 5000 characters.
            character_coverage=0.9995,
            byte_fallback=True,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            allow_whitespace_only_pieces=True,
            split_digits=True,
            user_defined_symbols=["\n", "\t", *CHAT_SPECIAL_TOKENS],
            max_sentence_length=_MAX_SENTENCE_BYTES,
            pad_id=PAD_ID,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            num_threads=max(1, os.cpu_count() or 1),
            minloglevel=2,
        )
    except RuntimeError as e:
        reason = _short_spm_error(e)
        if "ocabulary size" in reason:  # the one failure a user causes: vocab too small for bytes + characters
            raise ConfigError(f"tokenizer vocab_size={vocab_size}: {reason}") from None
        raise ConfigError(f"tokenizer training failed on {input_glob!r}: {reason}") from None

    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = f"{out}.tmp"
    with open(tmp, "wb") as f:
        f.write(model.getvalue())
    os.replace(tmp, out)  # a crashed run never leaves a truncated model behind
    vocab = spm.SentencePieceProcessor(model_proto=model.getvalue()).vocab_size()
    log.info("tokenizer: trained BPE vocab %d on %d chars from %d file(s) in %.1fs -> %s", vocab,
             sum(map(len, texts)), len(texts), time.perf_counter() - start, out)
    return out
