"""data=text (trainrun/data/text.py): the corpus, the byte and BPE tokenisers, the verified token cache, the blocks and
their train/val/test split, the tokeniser record a run keeps, and the one-line refusals."""
from __future__ import annotations

import collections
import json
import logging
import shutil
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf

from trainrun.config import DataConfig
from trainrun.data import build_split, split_indices
from trainrun.data import text as textdata
from trainrun.data.datasets import check
from trainrun.data.text import (ByteTokenizer, blocks_of, load_text_set, read_corpus, tokenizer_from_spec,
                                train_bpe)
from trainrun.errors import ConfigError, DataError

PROSE = ("Le cœur a ses raisons que la raison ne connaît point. Über allen Gipfeln ist Ruh. "
         "東京は日本の首都です。 Ελληνικά κείμενα. The quick brown fox jumps over the lazy dog. ")


def text_cfg(tmp_path, **values):
    cfg = OmegaConf.structured(DataConfig)
    cfg.name, cfg.cache_dir = "text", str(tmp_path / "cache")
    for k, v in values.items():
        cfg[k] = v
    return cfg


def write_corpus(folder, n_files=3, repeat=40):
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(n_files):
        (folder / f"doc{k}.txt").write_text("".join(f"{k}:{i} {PROSE}" for i in range(repeat)), encoding="utf-8")
    return folder


def stream_of(folder) -> bytes:
    return "\n".join((p.read_text(encoding="utf-8")) for p in sorted(folder.iterdir())).encode()


# ---------------------------------------------------------------------------------------------------- tokenisers
def test_byte_tokenizer_round_trip_is_utf8():
    tok = ByteTokenizer()
    ids = tok.encode(PROSE)
    assert ids == list(PROSE.encode("utf-8")) and tok.vocab_size == 256
    assert tok.decode(ids) == PROSE
    assert tok.decode(list("é".encode())[:1]) == "\ufffd"  # a sample cut inside a character: replaced, no error


def test_bpe_round_trip_on_unseen_non_ascii_text_and_compresses():
    tok = train_bpe([PROSE * 20, "def f(x):\n    return x + 1\n" * 50], 300)
    assert 256 < tok.vocab_size <= 300
    unseen = "Ça va? 🙂 Ωmega — ünïcödé, 漢字 and bytes \x01\x7f"
    assert tok.decode(tok.encode(unseen)) == unseen  # the full byte alphabet: any text encodes
    assert len(tok.encode(PROSE)) < len(PROSE.encode())


def test_bpe_first_merge_is_the_most_frequent_pair():
    """The reference: count adjacent symbol pairs over the byte-level pre-tokenised words by hand."""
    corpus = ["abab abab abab xyz xy", "abab cd cd ab"]
    tok = train_bpe(corpus, 257)
    pairs = collections.Counter()
    for text in corpus:
        for word, _ in tok.tokenizer.pre_tokenizer.pre_tokenize_str(text):
            pairs.update(zip(word, word[1:]))
    (best, count), (_, second) = pairs.most_common(2)
    assert count > second
    merges = json.loads(tok.tokenizer.to_str())["model"]["merges"]
    first = merges[0] if isinstance(merges[0], list) else merges[0].split(" ")
    assert tuple(first) == best and len(merges) == 1


def test_bpe_training_is_deterministic_across_processes():
    texts = [PROSE * 5, "for i in range(10):\n    print(i)\n" * 20]
    here = train_bpe(texts, 400).tokenizer.to_str()
    assert train_bpe(texts, 400).tokenizer.to_str() == here
    code = ("import json, sys; from trainrun.data.text import train_bpe; "
            "print(train_bpe(json.loads(sys.stdin.read()), 400).tokenizer.to_str())")
    out = subprocess.run([sys.executable, "-c", code], input=json.dumps(texts), capture_output=True, text=True,
                         check=True, timeout=60)
    assert out.stdout.strip() == here


# ------------------------------------------------------------------------------------------------- corpus and blocks
def test_blocks_are_exact_shifts_of_the_byte_stream(tmp_path):
    folder = write_corpus(tmp_path / "c")
    cfg = text_cfg(tmp_path, root=str(folder), block_size=16, val_fraction=0.25, test_fraction=0.1)
    split = load_text_set(cfg)
    stream = torch.tensor(list(stream_of(folder)))
    blocks = blocks_of(stream, 16)
    train, val, test = split_indices(len(blocks), cfg)
    for part, idx in ((split.train, train), (split.val, val), (split.test, test)):
        assert part.x.dtype == part.y.dtype == torch.int64 and part.x.shape == (len(idx), 16)
        assert torch.equal(part.x, blocks[idx, :-1]) and torch.equal(part.y, blocks[idx, 1:])
    assert sorted(torch.cat([train, val, test]).tolist()) == list(range(len(blocks)))  # disjoint, all blocks
    assert (len(val), len(test)) == (round(len(blocks) * 0.25), round(len(blocks) * 0.1))
    assert split.num_classes == 256 and split.input_shape == (16,)
    assert split.preprocess == {"tokenizer": {"kind": "bytes"}}


def test_bpe_splits_never_share_text_and_blocks_shift_their_stream(tmp_path):
    folder = write_corpus(tmp_path / "c", n_files=4)
    cfg = text_cfg(tmp_path, root=str(folder), block_size=8, tokenizer="bpe", vocab_size=320)
    split = load_text_set(cfg)
    corpus = read_corpus(str(folder))
    texts = textdata.expected_texts(corpus, cfg)
    tok = tokenizer_from_spec(split.preprocess["tokenizer"])
    assert tok.vocab_size == split.num_classes and split.num_classes <= 320
    assert sum(len(t) for t in texts.values()) == len(corpus.text)
    for name, part in (("train", split.train), ("val", split.val)):
        assert torch.equal(part.x[:, 1:], part.y[:, :-1])
        joined = torch.cat([part.x, part.y[:, -1:]], 1).flatten().tolist()
        assert texts[name].encode().startswith(tok.decode(joined).encode())  # the split's own text, in order
    # trained on the training pieces only: a tokeniser trained on them is the run's
    pieces = textdata._pieces(corpus.text, cfg)
    assert train_bpe(pieces["train"], 320).tokenizer.to_str() == split.preprocess["tokenizer"]["json"]


def test_max_bytes_cuts_at_a_character_boundary(tmp_path):
    (tmp_path / "a.txt").write_text("é" * 10, encoding="utf-8")
    assert read_corpus(str(tmp_path / "a.txt"), max_bytes=5).text == "éé"


def test_folder_reads_sorted_paths_and_skips_hidden(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "2.txt").write_text("two")
    (tmp_path / "a.txt").write_text("one")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "index").write_bytes(b"\0\1binary")
    assert read_corpus(str(tmp_path)).text == "one\ntwo"


# -------------------------------------------------------------------------------------------- determinism, cache
def test_loads_are_deterministic_and_the_fingerprint_follows_the_data(tmp_path):
    folder = write_corpus(tmp_path / "c")
    cfg = text_cfg(tmp_path, root=str(folder), block_size=16)
    a, b = load_text_set(cfg), load_text_set(text_cfg(tmp_path / "other", root=str(folder), block_size=16))
    assert a.fingerprint == b.fingerprint and torch.equal(a.train.x, b.train.x) and torch.equal(a.val.y, b.val.y)
    moved = shutil.copytree(folder, tmp_path / "elsewhere" / "c")  # the same files elsewhere: the same data
    assert load_text_set(text_cfg(tmp_path, root=str(moved), block_size=16)).fingerprint == a.fingerprint
    cfg.block_size = 12
    assert load_text_set(cfg).fingerprint != a.fingerprint
    cfg.block_size = 16
    (folder / "doc1.txt").write_text((folder / "doc1.txt").read_text().replace("fox", "cat"))
    assert load_text_set(cfg).fingerprint != a.fingerprint


def test_python_corpus_fingerprint_records_the_python_version(monkeypatch):
    digest = read_corpus("python:pydoc", max_bytes=2000).digest
    monkeypatch.setattr(sys, "version", "9.9.9 (other)")
    assert read_corpus("python:pydoc", max_bytes=2000).digest != digest


@pytest.mark.parametrize("tokenizer", ["bytes", "bpe"])
def test_second_load_reads_the_cache_instead_of_tokenising(tmp_path, monkeypatch, tokenizer):
    cfg = text_cfg(tmp_path, root=str(write_corpus(tmp_path / "c")), block_size=16, tokenizer=tokenizer,
                   vocab_size=300)
    first = load_text_set(cfg)
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 1

    def no_tokenize(*a, **k):
        raise AssertionError("tokenised again")

    monkeypatch.setattr(textdata, "tokenize", no_tokenize)
    second = load_text_set(cfg)
    assert second.fingerprint == first.fingerprint and second.preprocess == first.preprocess
    assert torch.equal(second.train.x, first.train.x)


def _corrupt_file(path):
    path.write_bytes(path.read_bytes()[:200])


def _wrong_tokens(path):
    obj = torch.load(path, weights_only=True)
    obj["streams"]["all"][5] = (obj["streams"]["all"][5] + 1) % 256
    torch.save(obj, path)


def _out_of_range(path):
    obj = torch.load(path, weights_only=True)
    obj["streams"]["all"][0] = 300
    torch.save(obj, path)


def _wrong_dtype(path):
    obj = torch.load(path, weights_only=True)
    obj["streams"]["all"] = obj["streams"]["all"].float()
    torch.save(obj, path)


@pytest.mark.parametrize("damage", [_corrupt_file, _wrong_tokens, _out_of_range, _wrong_dtype])
def test_a_damaged_cache_is_rebuilt_with_a_warning(tmp_path, monkeypatch, caplog, damage):
    cfg = text_cfg(tmp_path, root=str(write_corpus(tmp_path / "c")), block_size=16)
    good = load_text_set(cfg)
    (path,) = (tmp_path / "cache").glob("*.pt")
    damage(path)
    with caplog.at_level(logging.WARNING, logger="trainrun"):
        again = load_text_set(cfg)
    assert "unusable" in caplog.text and str(path) in caplog.text
    assert again.fingerprint == good.fingerprint and torch.equal(again.train.x, good.train.x)
    monkeypatch.setattr(textdata, "tokenize", lambda *a: pytest.fail("the rebuilt cache was not written"))
    assert load_text_set(cfg).fingerprint == good.fingerprint
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [path.name]  # no temporary file left


def test_a_cache_of_another_bpe_tokenizer_is_not_used(tmp_path, caplog):
    cfg = text_cfg(tmp_path, root=str(write_corpus(tmp_path / "c")), block_size=16, tokenizer="bpe", vocab_size=300)
    good = load_text_set(cfg)
    (path,) = (tmp_path / "cache").glob("*.pt")
    obj = torch.load(path, weights_only=True)
    obj["tokenizer"] = {"kind": "bpe", "json": "{not json"}
    torch.save(obj, path)
    with caplog.at_level(logging.WARNING, logger="trainrun"):
        assert load_text_set(cfg).preprocess == good.preprocess
    assert "unusable" in caplog.text


# ------------------------------------------------------------------------------------------- shipped corpora, spec
@pytest.mark.parametrize("root", ["python:stdlib", "python:pydoc"])
def test_python_corpora_load_offline(tmp_path, root):
    split = load_text_set(text_cfg(tmp_path, root=root, block_size=32, max_bytes=40_000))
    assert split.description.startswith(f"text {root} (Python {sys.version.split()[0]}")
    assert "40,000 bytes" in split.description and len(split.train) + len(split.val) == 40_000 // 33
    decoded = ByteTokenizer().decode(split.train.x[0].tolist())
    assert decoded.isprintable() or "\n" in decoded


@pytest.mark.parametrize("tokenizer", ["bytes", "bpe"])
def test_tokenizer_spec_round_trips_through_json(tmp_path, tokenizer):
    split = load_text_set(text_cfg(tmp_path, root=str(write_corpus(tmp_path / "c")), block_size=16,
                                   tokenizer=tokenizer, vocab_size=300))
    record = json.loads(json.dumps(split.preprocess))
    if tokenizer == "bytes":
        original = ByteTokenizer()
    else:
        from tokenizers import Tokenizer

        original = textdata.BPETokenizer(Tokenizer.from_str(split.preprocess["tokenizer"]["json"]))
    restored = tokenizer_from_spec(record["tokenizer"])
    assert restored.vocab_size == split.num_classes
    assert restored.encode(PROSE) == original.encode(PROSE) and restored.decode(restored.encode(PROSE)) == PROSE


def test_data_text_composes_and_passes_the_checks():
    from hydra import compose, initialize_config_dir

    from trainrun.cli import CONFIGS_DIR, setup

    setup()
    with initialize_config_dir(config_dir=str(CONFIGS_DIR), version_base="1.3", job_name="text_data"):
        cfg = compose("config", overrides=["data=text"])
    assert (cfg.data.name, cfg.data.root, cfg.data.tokenizer, cfg.data.block_size) == ("text", "python:stdlib",
                                                                                       "bytes", 128)
    assert 1_000_000 <= cfg.data.max_bytes <= 2_000_000
    check(cfg.data)


def test_build_split_limits_text_blocks(tmp_path):
    cfg = text_cfg(tmp_path, root=str(write_corpus(tmp_path / "c")), block_size=16, limit_train=5, limit_val=3)
    split = build_split(cfg, classifies=False)
    assert (len(split.train), len(split.val)) == (5, 3) and split.train.x.shape == (5, 16)
    assert split.vocab_size == 256


def test_batches_of_blocks_resume_mid_epoch(tmp_path):
    from trainrun.data import BatchStream

    split = load_text_set(text_cfg(tmp_path, root=str(write_corpus(tmp_path / "c")), block_size=16))
    stream = lambda: BatchStream(split.train, 4, seed=3, shuffle=True, drop_last=True)  # noqa: E731
    full, resumed = list(stream().iter_epoch(1)), list(stream().iter_epoch(1, start=2))
    assert len(full) == len(split.train) // 4 and len(resumed) == len(full) - 2
    for (x, y, idx), (rx, ry, ridx) in zip(full[2:], resumed):
        assert torch.equal(x, rx) and torch.equal(y, ry) and torch.equal(idx, ridx)
    x, y, idx = full[0]
    assert x.shape == (4, 16) and x.dtype == torch.int64 and torch.equal(x, split.train.x[idx])


# ------------------------------------------------------------------------------------------------------ refusals
@pytest.mark.parametrize("values, error, words", [
    ({"block_size": 1}, ConfigError, "data.block_size=1: a block needs at least 2 tokens"),
    ({"tokenizer": "wordpiece"}, ConfigError, "data.tokenizer='wordpiece': must be one of bytes, bpe"),
    ({"tokenizer": "bpe", "vocab_size": 256}, ConfigError, "choose a size in [257, 1048576]"),
    ({"tokenizer": "bpe", "vocab_size": 2 ** 20 + 1}, ConfigError, "data.vocab_size=1048577"),
    ({"root": "python:numpy"}, ConfigError, "the corpora that ship with Python are python:stdlib, python:pydoc"),
    ({"max_bytes": 0}, ConfigError, "data.max_bytes=0: must be > 0"),
    ({"augment": True}, ConfigError, "data=text has no augmentation"),
])
def test_bad_settings_are_refused_in_one_line(tmp_path, values, error, words):
    cfg = text_cfg(tmp_path, **{"root": str(write_corpus(tmp_path / "c")), **values})
    for run in (check, load_text_set):
        with pytest.raises(error) as e:
            run(cfg)
        assert words in str(e.value) and "\n" not in str(e.value)


def test_bad_corpora_are_refused_in_one_line(tmp_path):
    cases = [(tmp_path / "missing", "data.root=", "not found")]
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "blank.txt").write_text("")
    cases.append((tmp_path / "empty", "holds no text", "point it at text files"))
    (tmp_path / "mixed").mkdir()
    (tmp_path / "mixed" / "a.txt").write_text("fine text")
    (tmp_path / "mixed" / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n\0\0")
    cases.append((tmp_path / "mixed", "b.png", "holds NUL bytes"))
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    cases.append((tmp_path / "latin1.txt", "latin1.txt", "byte 3 is not UTF-8"))
    (tmp_path / "short.txt").write_text("x" * 20)
    cases.append((tmp_path / "short.txt", "fewer than 2 blocks of data.block_size+1=17", "lower data.block_size"))
    for root, *words in cases:
        with pytest.raises(DataError) as e:
            load_text_set(text_cfg(tmp_path, root=str(root), block_size=16))
        assert all(w in str(e.value) for w in words) and "\n" not in str(e.value), str(e.value)


def test_bpe_on_too_little_text_is_refused(tmp_path):
    (tmp_path / "short.txt").write_text("y" * 60)
    with pytest.raises(DataError, match="fewer than 2 pieces"):
        load_text_set(text_cfg(tmp_path, root=str(tmp_path / "short.txt"), block_size=16, tokenizer="bpe",
                               vocab_size=300))


@pytest.mark.parametrize("spec, words", [
    (None, "kind None"),
    ({"kind": "sentencepiece"}, "kind 'sentencepiece'"),
    ({"kind": "bpe"}, "not a byte-level BPE tokenizer JSON"),
    ({"kind": "bpe", "json": "{broken"}, "not a byte-level BPE tokenizer JSON"),
    ({"kind": "bpe", "json": json.dumps({"model": {"type": "WordPiece"}})}, "not a byte-level BPE"),
    ({"kind": "bpe", "json": json.dumps({"model": {"type": "BPE"}, "decoder": "ByteLevel"})}, "not a byte-level"),
    ({"kind": "bpe", "json": "[1, 2]"}, "not a byte-level BPE"),
    ({"kind": "bpe", "json": json.dumps({"model": {"type": "BPE"}, "decoder": {"type": "ByteLevel"}})},
     "does not load"),
])
def test_bad_tokenizer_records_are_refused_in_one_line(spec, words):
    with pytest.raises(ConfigError) as e:
        tokenizer_from_spec(spec)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_bpe_without_tokenizers_names_the_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    with pytest.raises(ConfigError, match=r"pip install 'trainrun\[text\]'"):
        load_text_set(text_cfg(tmp_path, root=str(write_corpus(tmp_path / "c")), tokenizer="bpe", vocab_size=300))
