"""Text corpora: tokenization, vocabulary, fixed splits, file corpora, windows and planted sequences."""

import pytest
import torch

from privfast.text import EOS, UNK, Tokenizer, Vocabulary, load_corpus, plant, pydoc_text, windows


@pytest.fixture(scope="module")
def corpus():
    return load_corpus("pydoc", level="word")


def test_word_tokenizer_splits_digits_and_punctuation_runs():
    tokens = Tokenizer("word")("The Number is 42, see x_y --- ok\nnext line\n\n")
    assert tokens == ["the", "number", "is", "4", "2", ",", "see", "x_y", "---", "ok", EOS, "next", "line", EOS]
    assert Tokenizer("word", "whitespace")("A b N\n") == ["A", "b", "N", EOS]
    assert Tokenizer("char")("ab\n") == ["a", "b", "\n"]


def test_vocabulary_counts_and_unknowns():
    vocab = Vocabulary.build(["b", "a", "b", "c", "c", "b", EOS], min_count=2, keep=(EOS,))
    assert vocab.tokens == (UNK, EOS, "b", "c")  # most frequent first; "a" (seen once) is <unk>
    assert vocab.encode(["b", "a", "zz"]).tolist() == [2, 0, 0]
    assert vocab.decode([3, 2]) == ["c", "b"]
    with pytest.raises(ValueError):
        Vocabulary(("a", UNK))


def test_pydoc_corpus_is_fixed_and_split_by_paragraph(corpus):
    assert "assert" in pydoc_text()
    again = load_corpus("pydoc", level="word")
    assert torch.equal(again.train, corpus.train) and torch.equal(again.test, corpus.test)
    assert len(corpus.train) > 8 * len(corpus.test) / 1.5 > 0 and len(corpus.valid) > 1000
    # The vocabulary comes from the training split only: a token of the test split alone is <unk>.
    train_tokens = set(corpus.vocab.decode(corpus.train.unique()))
    assert set(corpus.vocab.tokens) == train_tokens | {UNK}
    for digit in "0123456789":
        assert digit in corpus.vocab
    text = "the first number is 1 2 3"
    assert corpus.decode(corpus.encode(text)) == text


def test_char_corpus():
    corpus = load_corpus("pydoc", level="char")
    assert len(corpus.vocab) < 200 and "\n" in corpus.vocab
    assert corpus.decode(corpus.encode("the key is 3f\n")) == "the key is 3f\n"


def test_file_corpora_read_from_root_and_missing_files_are_listed(tmp_path):
    (tmp_path / "ptb").mkdir()
    for split, text in (("train", "a b <unk> a\nb a\n"), ("valid", "a c\n"), ("test", "b\n")):
        (tmp_path / "ptb" / f"ptb.{split}.txt").write_text(text)
    corpus = load_corpus("ptb", root=tmp_path, min_count=1)
    assert corpus.decode(corpus.train) == "a b <unk> a\nb a\n"
    assert corpus.vocab.decode(corpus.valid) == ["a", UNK, EOS]  # "c" is not in the training split
    with pytest.raises(FileNotFoundError, match="wiki.train.tokens"):
        load_corpus("wikitext-2", root=tmp_path)
    with pytest.raises(FileNotFoundError, match="ptb.train.txt"):
        load_corpus("ptb")
    with pytest.raises(ValueError, match="corpus must be"):
        load_corpus("imdb")


def test_windows_cover_every_target_once():
    stream = torch.arange(23)
    rows = windows(stream, length=5)
    assert rows.shape == (4, 6)
    assert torch.equal(rows[:, 1:].flatten(), torch.arange(1, 21))  # targets: each token once, in order
    assert torch.equal(rows[1, :-1], torch.arange(5, 10))
    rows[0, 0] = -1
    assert stream[0] == 0  # a copy
    with pytest.raises(ValueError, match="holds no window"):
        windows(torch.arange(5), length=5)


def test_plant_puts_each_occurrence_in_its_own_window():
    rows = torch.zeros(20, 8, dtype=torch.int64)
    sequences = [torch.tensor([7, 7, 7]), torch.tensor([9, 9])]
    planted, where = plant(rows, sequences, [5, 3], generator=torch.Generator().manual_seed(0))
    windows_used = torch.cat([w[:, 0] for w in where])
    assert len(windows_used.unique()) == 8
    for sequence, w in zip(sequences, where):
        for window, offset in w.tolist():
            assert torch.equal(planted[window, offset : offset + len(sequence)], sequence)
    assert int((planted == 7).sum()) == 15 and int((planted == 9).sum()) == 6
    assert rows.abs().sum() == 0  # the input is not written


def test_plant_refuses_too_many_occurrences_or_long_sequences():
    rows = torch.zeros(10, 8, dtype=torch.int64)
    with pytest.raises(ValueError, match="holds 10 windows .* need 11 distinct windows"):
        plant(rows, [torch.tensor([1])], [11])
    with pytest.raises(ValueError, match="does not fit"):
        plant(rows, [torch.arange(9)], [1])
