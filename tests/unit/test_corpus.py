import json
from pathlib import Path

import pytest
import torch

from recipes.awd_lstm.corpus import (PTB, WIKITEXT2, BpttSampler, Corpus, Dictionary, batchify,
                                     eval_columns, get_batch)
from trainer.errors import DataError

SHARED = Path(__file__).resolve().parents[2].parent / 'shared' / 'data'


@pytest.fixture(scope='module')
def ptb():
    return Corpus.from_dir(SHARED / 'ptb')


@pytest.fixture(scope='module')
def wt2():
    return Corpus.from_dir(SHARED / 'wikitext-2')


def test_ptb_counts(ptb):
    assert len(ptb.dictionary) == 10_000
    assert (len(ptb.train), len(ptb.valid), len(ptb.test)) == (929_589, 73_760, 82_430)
    assert ptb.train.dtype == torch.long and ptb.train.dim() == 1
    assert int(ptb.test.max()) < 10_000


def test_wikitext2_counts(wt2):
    assert len(wt2.dictionary) == 33_278
    assert (len(wt2.train), len(wt2.valid), len(wt2.test)) == (2_088_628, 217_646, 245_569)


def test_ids_in_order_of_first_appearance(ptb):
    d = ptb.dictionary
    first = (SHARED / 'ptb' / 'train.txt').read_text().split('\n')[0].split()
    assert d.idx2word[:len(dict.fromkeys(first))] == list(dict.fromkeys(first))
    assert [d.idx2word[i] for i in ptb.train[:len(first) + 1].tolist()] == first + ['<eos>']
    assert all(d.word2idx[w] == i for i, w in enumerate(d.idx2word))


def test_vocab_digest(ptb, wt2):
    assert ptb.vocab_digest() != wt2.vocab_digest()
    # pinned: a change here would make every saved checkpoint look like another vocabulary
    assert ptb.vocab_digest() == '6f75f9b77981aa69'
    assert wt2.vocab_digest() == '45f2cb999804e259'


def test_specs_point_at_canonical_sources():
    assert PTB.sources[0].url == 'http://www.fit.vutbr.cz/~imikolov/rnnlm/simple-examples.tgz'
    assert PTB.sources[0].members['train.txt'] == './simple-examples/data/ptb.train.txt'
    assert [s.kind for s in PTB.sources] == ['tgz', 'file', 'file', 'file']
    assert WIKITEXT2.sources[0].members['test.txt'] == 'wikitext-2/wiki.test.tokens'


# --- tokenizing small files -----------------------------------------------------------------------

def write_splits(d, train, valid=b' b \n', test=b' c \n'):
    for name, data in (('train.txt', train), ('valid.txt', valid), ('test.txt', test)):
        (d / name).write_bytes(data)


def test_tokenize_lines_like_text_mode_iteration(tmp_path):
    # \r\n and lone \r end lines; \x0c does not (str.splitlines would split there); a last line
    # without a newline still counts; a blank line is a lone <eos>
    write_splits(tmp_path, b'a b\r\nb\x0cc\n\nd\re', valid=b'a z\n', test=b'\xc3\xa9\n')
    c = Corpus.from_dir(tmp_path)
    words = c.dictionary.idx2word
    assert words == ['a', 'b', '<eos>', 'c', 'd', 'e', 'z', '\u00e9']
    assert [words[i] for i in c.train.tolist()] == \
        ['a', 'b', '<eos>', 'b', 'c', '<eos>', '<eos>', 'd', '<eos>', 'e', '<eos>']
    assert c.valid.tolist() == [0, 6, 2] and c.test.tolist() == [7, 2]


@pytest.mark.parametrize('bad, match', [
    (b'ok line\n\xff\xfe bad\n', r'valid\.txt is not UTF-8'),
    (b'', r'valid\.txt has no tokens'),
    (b'\n \n', r'valid\.txt has no tokens'),
])
def test_bad_files_name_the_file(tmp_path, bad, match):
    write_splits(tmp_path, b' a \n', valid=bad)
    with pytest.raises(DataError, match=match):
        Corpus.from_dir(tmp_path)


def test_missing_split_is_a_data_error(tmp_path):
    (tmp_path / 'train.txt').write_bytes(b'a\n')
    with pytest.raises(DataError, match=r'valid\.txt is missing'):
        Corpus.from_dir(tmp_path)


def test_dictionary():
    d = Dictionary()
    assert [d.add_word(w) for w in 'x y x z'.split()] == [0, 1, 0, 2]
    assert len(d) == 3 and d.idx2word == ['x', 'y', 'z'] and d.word2idx['z'] == 2


# --- batching -------------------------------------------------------------------------------------

def test_batchify_layout():
    data = torch.arange(103)
    b = batchify(data, 10)
    assert b.shape == (10, 10) and b.is_contiguous()
    assert torch.equal(b, data[:100].view(10, -1).t().contiguous())
    assert b[:, 3].tolist() == list(range(30, 40))  # column j is the j-th slice of the stream
    with pytest.raises(ValueError):
        batchify(torch.arange(5), 10)


@pytest.mark.parametrize('ncols, world', [(10, 2), (1, 2), (3, 2), (10, 3), (2, 8), (0, 2), (7, 7)])
def test_eval_columns_cover_all(ncols, world):
    ranges = [eval_columns(ncols, r, world) for r in range(world)]
    assert [c for r in ranges for c in r] == list(range(ncols))  # in order, so disjoint and complete
    sizes = [len(r) for r in ranges]
    assert max(sizes) - min(sizes) <= 1
    assert all(r.step == 1 for r in ranges)


def test_eval_columns_small_batch():
    assert eval_columns(1, 0, 2) == range(0, 1) and len(eval_columns(1, 1, 2)) == 0


def test_get_batch():
    src = batchify(torch.arange(100), 4)  # (25, 4)
    x, y = get_batch(src, 3, 7)
    assert x.shape == y.shape == (7, 4) and y.is_contiguous()
    assert torch.equal(x, src[3:10]) and torch.equal(y, src[4:11])
    x, y = get_batch(src, 20, 70)  # shortened at the end
    assert x.shape == y.shape == (4, 4) and torch.equal(y[-1], src[-1])


# --- variable BPTT --------------------------------------------------------------------------------

def draw(s, n):
    return [s.next_len() for _ in range(n)]


def test_sampler_same_seed_same_lengths():
    assert draw(BpttSampler(70, 1), 500) == draw(BpttSampler(70, 1), 500)
    assert draw(BpttSampler(70, 1), 500) != draw(BpttSampler(70, 2), 500)


def test_sampler_resume_is_exact():
    a = BpttSampler(70, 123)
    draw(a, 37)
    state = json.loads(json.dumps(a.state_dict()))
    expected = draw(a, 200)
    b = BpttSampler(70, 999)
    b.load_state_dict(state)
    assert draw(b, 200) == expected


def test_sampler_distribution():
    lens = draw(BpttSampler(70, 0), 20_000)
    assert min(lens) >= 5
    near = sum(l >= 50 for l in lens) / len(lens)
    assert 0.94 < near < 0.96
    half = [l for l in lens if l < 50]
    assert 30 < sum(half) / len(half) < 40  # the other 5% sit around bptt / 2
    assert BpttSampler(2, 0).next_len() >= 5


def test_sampler_never_caps_a_long_draw():
    """The reference's cap (bptt + 10, or + 20) is commented out in its main.py: a 4-sigma draw stays what it is."""
    lens = draw(BpttSampler(70, 0), 100_000)
    assert max(lens) == 91  # this seed draws one length past bptt + 20 in 100k steps

    class Extreme:
        def random(self):
            return 0.0

        def normal(self, loc, scale):
            return loc + 100 * scale

    s = BpttSampler(70, 0)
    s.rng = Extreme()
    assert s.next_len() == 570
