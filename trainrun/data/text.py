"""Token data from text (data=text): a corpus read as UTF-8, tokenised once and cached, cut into blocks.

The corpus (`data.root`): a text file, a folder (every file under it in sorted path order, hidden files and folders
skipped), or one of two corpora that ship with Python, so the default runs offline: `python:stdlib` (the standard
library's top-level `.py` sources) and `python:pydoc` (the English documentation topics of `pydoc_data`). Documents
are joined with one newline; `data.max_bytes` keeps the first max_bytes bytes of that text (files past the cut are
not read).

Tokenisers: `bytes` (the UTF-8 bytes, vocabulary 256) and `bpe` (a Hugging Face `tokenizers` byte-level BPE of
data.vocab_size, trained here on the training split's text only).

Blocks: a token stream is cut into non-overlapping blocks of block_size + 1 tokens, x = block[:-1], y = block[1:].
- bytes: the whole corpus is one stream; its blocks are assigned to train/val(/test) by `split_indices`, exactly as
  the samples of the other in-memory sets.
- bpe: the tokeniser must not see validation or test text, so the split is made on the TEXT first: the corpus is cut
  into pieces of (block_size + 1) * BPE_PIECE_CHARS characters (about one block of tokens each), the pieces are
  assigned by `split_indices`, the BPE is trained on the training pieces, and each split's pieces are tokenised
  (piece by piece) into that split's own stream, then cut into blocks.

Cache: `<data.cache_dir or $XDG_CACHE_HOME (~/.cache)/trainrun/text>/<key>.pt`, key = sha256 over the corpus
(document names and text; the Python version for python:*), the tokeniser settings and, for bpe, the split settings
its training text depends on. The file is untrusted: loaded with weights_only, its structure, dtypes and token range checked and
its tokens decoded back to the corpus text; anything else is rebuilt (one warning line). Writes are atomic.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from trainrun.checks import SectionChecks
from trainrun.data.datasets import Split, TensorSet, split_indices
from trainrun.errors import ConfigError, DataError

log = logging.getLogger("trainrun")

CORPORA = ("python:stdlib", "python:pydoc")
TOKENIZERS = ("bytes", "bpe")
BYTE_VOCAB = 256
# bpe: at least one merge above the 256 byte symbols (256 would be the bytes tokeniser, slower); at most 2**20, an
# embedding and an output head of 2**20 x width: more is a typo, not a vocabulary (GPT-4's is about 100k)
MIN_BPE_VOCAB, MAX_BPE_VOCAB = BYTE_VOCAB + 1, 2 ** 20
BPE_PIECE_CHARS = 4  # bpe split pieces: characters per token of block (byte-level BPE on code: ~2.5-4 chars a token)
CACHE_VERSION = 1  # bump when what the cache file holds changes
INSTALL_TOKENIZERS = "pip install 'trainrun[text]' (or pip install 'tokenizers>=0.15')"


# ------------------------------------------------------------------------------------------------------- the corpus
@dataclass
class Corpus:
    name: str  # for the description: the root, with the Python version and document count
    text: str
    digest: str  # sha256 over the document names, max_bytes and the text (and the Python version for python:*)


def _stdlib_documents() -> Iterator[Tuple[str, bytes]]:
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(p for p in root.glob("*.py") if p.is_file()):
        yield path.name, path.read_bytes()


def _pydoc_documents() -> Iterator[Tuple[str, bytes]]:
    try:
        from pydoc_data.topics import topics
    except ImportError as e:
        raise DataError("data.root=python:pydoc: this Python has no pydoc_data (some distributions package it "
                        "separately); install it or use data.root=python:stdlib") from e
    for key in sorted(topics):
        yield key, str(topics[key]).encode("utf-8")


def _file_documents(root: Path) -> Iterator[Tuple[str, bytes]]:
    if root.is_file():
        yield root.name, root.read_bytes()
        return
    paths = sorted(p for p in root.rglob("*") if p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(root).parts))
    for path in paths:
        yield path.relative_to(root).as_posix(), path.read_bytes()


def _decode(name: str, data: bytes, root: str) -> str:
    why = "it holds NUL bytes (a binary file)" if b"\0" in data else None
    if why is None:
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as e:
            why = f"byte {e.start} is not UTF-8 ({e.reason})"
    raise DataError(f"data=text: {name} in {root} is not UTF-8 text: {why}; remove it, or set data.root to a file "
                    "or folder of text files only")


def read_corpus(root: str, max_bytes: Optional[int] = None) -> Corpus:
    """The corpus text of data.root (see the module docstring), cut at max_bytes."""
    if root in CORPORA:
        documents = _stdlib_documents() if root == "python:stdlib" else _pydoc_documents()
        header = [root, sys.version]
    else:
        path = Path(root).expanduser()
        if not path.exists():
            raise DataError(f"data=text: data.root={root} not found; set it to a text file, a folder of text files, "
                            f"or one of {', '.join(CORPORA)}")
        documents, header = _file_documents(path), ["files"]  # names relative to root: the corpus may move
    names, texts, size = [], [], 0
    for name, data in documents:
        if max_bytes is not None and size >= max_bytes:
            break
        texts.append(_decode(name, data, root))
        names.append(name)
        size += len(data) + 1
    text = "\n".join(texts)
    if max_bytes is not None:  # only the last character can be cut in two: every document decoded whole
        text = text.encode("utf-8")[:max_bytes].decode("utf-8", errors="ignore")
    if not text:
        raise DataError(f"data=text: data.root={root} holds no text ({len(names)} files, all empty); point it at "
                        "text files")
    h = hashlib.sha256(json.dumps([*header, max_bytes, names]).encode())
    h.update(text.encode("utf-8"))
    version = f"Python {sys.version.split()[0]}, " if root in CORPORA else ""
    return Corpus(f"{root} ({version}{len(names)} documents)", text, h.hexdigest())


# -------------------------------------------------------------------------------------------------- the tokenisers
class TextTokenizer:
    """encode(str) -> token ids, decode(ids) -> str, vocab_size; spec(): the plain-JSON record of it (meta.json)."""
    kind = ""
    vocab_size = 0

    def encode(self, text: str) -> List[int]:
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def encode_many(self, texts: Sequence[str]) -> List[List[int]]:
        return [self.encode(t) for t in texts]

    def spec(self) -> Dict[str, str]:
        raise NotImplementedError


class ByteTokenizer(TextTokenizer):
    kind, vocab_size = "bytes", BYTE_VOCAB

    def encode(self, text: str) -> List[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        ids = [int(i) for i in ids]
        if any(not 0 <= i < BYTE_VOCAB for i in ids):
            raise ConfigError(f"byte tokens must be in [0, {BYTE_VOCAB}); got {min(ids)}..{max(ids)}")
        return bytes(ids).decode("utf-8", errors="replace")  # a sample may end inside a character

    def spec(self) -> Dict[str, str]:
        return {"kind": "bytes"}


class BPETokenizer(TextTokenizer):
    kind = "bpe"

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.vocab_size = tokenizer.get_vocab_size()

    def encode(self, text: str) -> List[int]:
        return self.tokenizer.encode(text).ids

    def encode_many(self, texts: Sequence[str]) -> List[List[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(list(texts))]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode([int(i) for i in ids])

    def spec(self) -> Dict[str, str]:
        return {"kind": "bpe", "json": self.tokenizer.to_str()}


def _tokenizers_module():
    try:
        import tokenizers
    except ImportError as e:
        raise ConfigError(f"data.tokenizer=bpe needs Hugging Face tokenizers: {INSTALL_TOKENIZERS}") from e
    return tokenizers


def train_bpe(texts: Sequence[str], vocab_size: int) -> BPETokenizer:
    """A byte-level BPE trained on `texts` (each its own sequence: no merge spans two). Deterministic: no dropout,
    no special tokens, the full 256-symbol byte alphabet (so any text encodes, seen or not) sorted before ids are
    given; word counts tie-break by pair id. min_frequency 2: a pair seen once is not a pattern."""
    tk = _tokenizers_module()
    tokenizer = tk.Tokenizer(tk.models.BPE())
    tokenizer.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False, special_tokens=[],
                                     initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(list(texts), trainer=trainer)
    return BPETokenizer(tokenizer)


def tokenizer_from_spec(spec: dict) -> TextTokenizer:
    """The tokeniser a run recorded (Split.preprocess["tokenizer"], read back from an untrusted meta.json)."""
    kind = spec.get("kind") if isinstance(spec, dict) else None
    if kind == "bytes":
        return ByteTokenizer()
    if kind != "bpe":
        raise ConfigError(f"the run's tokenizer record has kind {kind!r}; expected one of {', '.join(TOKENIZERS)} "
                          "(meta.json is damaged or from another program)")
    text = spec.get("json")
    try:
        parsed = json.loads(text) if isinstance(text, str) else None
    except ValueError:
        parsed = None
    model, decoder = (parsed.get("model"), parsed.get("decoder")) if isinstance(parsed, dict) else (None, None)
    if not isinstance(model, dict) or model.get("type") != "BPE" \
            or not isinstance(decoder, dict) or decoder.get("type") != "ByteLevel":
        raise ConfigError("the run's bpe tokenizer record is not a byte-level BPE tokenizer JSON (meta.json is damaged"
                          " or edited); rerun the training or restore meta.json")
    tk = _tokenizers_module()
    try:
        tokenizer = BPETokenizer(tk.Tokenizer.from_str(text))
    except Exception as e:  # the Rust parser's errors are plain Exceptions
        raise ConfigError(f"the run's bpe tokenizer JSON does not load ({str(e).splitlines()[0][:200]}); meta.json "
                          "is damaged: rerun the training or restore it") from e
    if not MIN_BPE_VOCAB <= tokenizer.vocab_size <= MAX_BPE_VOCAB:
        raise ConfigError(f"the run's bpe tokenizer has {tokenizer.vocab_size} tokens, outside [{MIN_BPE_VOCAB}, "
                          f"{MAX_BPE_VOCAB}]; meta.json is damaged: rerun the training or restore it")
    return tokenizer


# ------------------------------------------------------------------------------------------- tokens, cached once
@dataclass
class Tokens:
    tokenizer: TextTokenizer
    streams: Dict[str, torch.Tensor]  # int32 [T]: "all" (bytes: the whole corpus) or "train"/"val"/"test" (bpe)


def _pieces(text: str, cfg) -> Dict[str, List[str]]:
    """bpe: the corpus cut into pieces of about one block of tokens, assigned to the splits (module docstring)."""
    size = (cfg.block_size + 1) * BPE_PIECE_CHARS
    pieces = [text[i:i + size] for i in range(0, len(text), size)]
    if len(pieces) < 2:
        raise DataError(f"data=text: the corpus has {len(text):,} characters, fewer than 2 pieces of {size:,} "
                        f"(data.block_size={cfg.block_size} tokens of ~{BPE_PIECE_CHARS} characters) to split into "
                        "train and val; add text, raise data.max_bytes or lower data.block_size")
    train, val, test = split_indices(len(pieces), cfg)
    parts = {"train": train, "val": val, **({"test": test} if test is not None else {})}
    return {name: [pieces[i] for i in idx.tolist()] for name, idx in parts.items()}


def expected_texts(corpus: Corpus, cfg) -> Dict[str, str]:
    """The text each token stream decodes to: what a cache file is verified against."""
    if cfg.tokenizer == "bytes":
        return {"all": corpus.text}
    return {name: "".join(pieces) for name, pieces in _pieces(corpus.text, cfg).items()}


def tokenize(corpus: Corpus, cfg) -> Tokens:
    """The corpus as token streams; bpe: the tokeniser trained on the training pieces first."""
    if cfg.tokenizer == "bytes":
        stream = torch.frombuffer(bytearray(corpus.text.encode("utf-8")), dtype=torch.uint8).to(torch.int32)
        return Tokens(ByteTokenizer(), {"all": stream})
    pieces = _pieces(corpus.text, cfg)
    tokenizer = train_bpe(pieces["train"], int(cfg.vocab_size))
    streams = {name: torch.tensor([t for ids in tokenizer.encode_many(part) for t in ids], dtype=torch.int32)
               for name, part in pieces.items()}
    return Tokens(tokenizer, streams)


def cache_key(corpus: Corpus, cfg) -> str:
    settings = {"version": CACHE_VERSION, "corpus": corpus.digest, "tokenizer": cfg.tokenizer}
    if cfg.tokenizer == "bpe":  # its training text is the training split's pieces; the library's version trains it
        settings.update(vocab_size=int(cfg.vocab_size), block_size=int(cfg.block_size), piece_chars=BPE_PIECE_CHARS,
                        val_fraction=float(cfg.val_fraction), test_fraction=float(cfg.get("test_fraction") or 0.0),
                        split_seed=int(cfg.split_seed), tokenizers=_tokenizers_module().__version__)
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def cache_path(cfg, key: str) -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache") / "trainrun" / "text"
    return Path(cfg.get("cache_dir") or default).expanduser() / f"{key}.pt"


def _decodes_to(tokenizer: TextTokenizer, stream: torch.Tensor, text: str) -> bool:
    if tokenizer.kind == "bytes":
        return stream.to(torch.uint8).numpy().tobytes() == text.encode("utf-8")
    return tokenizer.decode(stream.tolist()) == text


def _check_cache(obj, key: str, texts: Dict[str, str]) -> Tuple[Optional[str], Optional[Tokens]]:
    """(why the cached object is unusable, or None; the tokens it holds)."""
    if not isinstance(obj, dict) or obj.get("version") != CACHE_VERSION or obj.get("key") != key:
        return "not a trainrun text cache of this corpus and tokeniser", None
    streams = obj.get("streams")
    if not isinstance(streams, dict) or set(streams) != set(texts):
        return f"it holds the streams {sorted(streams) if isinstance(streams, dict) else streams!r}", None
    try:
        tokenizer = tokenizer_from_spec(obj.get("tokenizer"))
    except ConfigError as e:
        return str(e), None
    for name, stream in streams.items():
        if not isinstance(stream, torch.Tensor) or stream.dtype != torch.int32 or stream.ndim != 1 or not len(stream):
            return f"stream {name!r} is not a non-empty 1-D int32 tensor", None
        if len(stream) > len(texts[name].encode("utf-8")):
            return f"stream {name!r} has more tokens ({len(stream):,}) than its text has bytes", None
        if int(stream.min()) < 0 or int(stream.max()) >= tokenizer.vocab_size:
            return f"stream {name!r} holds ids outside [0, {tokenizer.vocab_size})", None
        if not _decodes_to(tokenizer, stream, texts[name]):
            return f"stream {name!r} does not decode to the corpus text", None
    return None, Tokens(tokenizer, dict(streams))


def _read_cache(path: Path, key: str, texts: Dict[str, str]) -> Optional[Tokens]:
    if not path.is_file():
        return None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: pickle, zip and torch errors alike
        why = f"it does not load: {type(e).__name__}"
    else:
        why, tokens = _check_cache(obj, key, texts)
        if why is None:
            return tokens
    log.warning("data=text: the cached tokens %s are unusable (%s); tokenising again", path, why)
    return None


def _write_cache(path: Path, key: str, tokens: Tokens) -> None:
    """Atomic (a temporary file renamed into place); a cache that cannot be written only costs the next run time."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            torch.save({"version": CACHE_VERSION, "key": key, "tokenizer": tokens.tokenizer.spec(),
                        "streams": tokens.streams}, f)
        os.replace(tmp, path)
    except OSError as e:
        log.warning("data=text: cannot write the token cache %s (%s); the next run tokenises again", path, e)
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def load_tokens(corpus: Corpus, cfg) -> Tokens:
    """The corpus's token streams: from the cache when it holds them (verified), else tokenised and cached."""
    key = cache_key(corpus, cfg)
    path = cache_path(cfg, key)
    tokens = _read_cache(path, key, expected_texts(corpus, cfg))
    if tokens is None:
        tokens = tokenize(corpus, cfg)
        _write_cache(path, key, tokens)
    return tokens


# ------------------------------------------------------------------------------------------------ blocks and split
def blocks_of(stream: torch.Tensor, block_size: int) -> torch.Tensor:
    """int64 [N, block_size + 1]: the stream's non-overlapping blocks, in order (a tail shorter than one dropped)."""
    n = len(stream) // (block_size + 1)
    return stream[:n * (block_size + 1)].view(n, block_size + 1).long()


def _block_sets(tokens: Tokens, cfg) -> Dict[str, torch.Tensor]:
    size = cfg.block_size + 1
    if "all" in tokens.streams:
        blocks = blocks_of(tokens.streams["all"], cfg.block_size)
        if len(blocks) < 2:
            raise DataError(f"data=text: the corpus is {len(tokens.streams['all']):,} tokens, fewer than 2 blocks of "
                            f"data.block_size+1={size}; add text, raise data.max_bytes or lower data.block_size")
        train, val, test = split_indices(len(blocks), cfg)
        return {"train": blocks[train], "val": blocks[val], **({"test": blocks[test]} if test is not None else {})}
    sets = {name: blocks_of(stream, cfg.block_size) for name, stream in tokens.streams.items()}
    for name, blocks in sets.items():
        if not len(blocks):
            raise DataError(f"data=text: the {name} split is {len(tokens.streams[name]):,} tokens, less than one "
                            f"block of data.block_size+1={size}; add text, raise data.max_bytes or lower "
                            "data.block_size")
    return sets


def _fingerprint(key: str, block_size: int, sets: Dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256(f"{key}:{block_size}".encode())
    for name, blocks in sets.items():
        h.update(f"{name}:{tuple(blocks.shape)}".encode())
        h.update(blocks.numpy().tobytes())
    return h.hexdigest()


def _describe(corpus: Corpus, tokens: Tokens, sets: Dict[str, torch.Tensor], block_size: int) -> str:
    tok = tokens.tokenizer
    how = "bytes (vocab 256)" if tok.kind == "bytes" else f"bpe (vocab {tok.vocab_size}, trained on the train split)"
    n_tokens = sum(len(s) for s in tokens.streams.values())
    sizes = " / ".join(f"{len(blocks):,} {name}" for name, blocks in sets.items())
    return (f"text {corpus.name}: {len(corpus.text.encode('utf-8')):,} bytes, {n_tokens:,} tokens, blocks of "
            f"{block_size} tokens: {sizes}, tokenizer {how}")


def load_text_set(cfg) -> Split:
    """data=text (registered as "text"): TensorSets of x, y int64 [N, block_size], y the next token of x."""
    check_text(cfg, SectionChecks(cfg, "data"))
    corpus = read_corpus(str(cfg.root), cfg.get("max_bytes"))
    tokens = load_tokens(corpus, cfg)
    sets = _block_sets(tokens, cfg)
    parts = {name: TensorSet(blocks[:, :-1].contiguous(), blocks[:, 1:].contiguous()) for name, blocks in sets.items()}
    split = Split(parts["train"], parts["val"], tokens.tokenizer.vocab_size, (int(cfg.block_size),),
                  _fingerprint(cache_key(corpus, cfg), int(cfg.block_size), sets),
                  _describe(corpus, tokens, sets, int(cfg.block_size)), test=parts.get("test"),
                  preprocess={"tokenizer": tokens.tokenizer.spec()})
    split.vocab_size = tokens.tokenizer.vocab_size  # kept when build_split(classifies=False) clears num_classes
    return split


def check_text(cfg, checks: SectionChecks) -> None:
    """Range checks of the data keys of data=text (called by trainrun.data.datasets.check)."""
    checks.one_of("tokenizer", TOKENIZERS)
    if cfg.block_size < 2:
        checks.fail("block_size", "a block needs at least 2 tokens (the model predicts each from those before "
                                  "it); use e.g. 128")
    checks.positive("max_bytes")
    if cfg.tokenizer == "bpe" and not MIN_BPE_VOCAB <= cfg.vocab_size <= MAX_BPE_VOCAB:
        checks.fail("vocab_size", f"a byte-level BPE has the 256 byte symbols plus at least one merge and at most "
                                  f"{MAX_BPE_VOCAB:,} tokens: choose a size in [{MIN_BPE_VOCAB}, {MAX_BPE_VOCAB}] "
                                  "(or data.tokenizer=bytes)")
    root = str(cfg.root)
    if root.startswith("python:") and root not in CORPORA:
        checks.fail("root", f"the corpora that ship with Python are {', '.join(CORPORA)}; or give a file or folder")
    if cfg.get("augment"):
        checks.fail("augment", "data=text has no augmentation; drop data.augment=true")
    if cfg.get("resize"):
        checks.fail("resize", "data=text holds tokens, not images; drop data.resize")
