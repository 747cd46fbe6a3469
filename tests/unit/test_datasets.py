import functools
import hashlib
import http.server
import io
import shutil
import tarfile
import threading
import time
import zipfile
from pathlib import Path

import pytest

import trainer.datasets as datasets
from recipes.awd_lstm.corpus import PTB, WIKITEXT2
from trainer.datasets import DatasetSpec, Source, ensure_dataset, resolve_dataset_dir
from trainer.errors import DataError

SHARED = Path(__file__).resolve().parents[2].parent / 'shared' / 'data'
DEAD = 'http://127.0.0.1:9/'  # discard port: nothing listens, connection refused at once

FAKE = {
    'train.txt': b' the cat sat on the mat \n a dog \n',
    'valid.txt': b' the dog sat \n',
    'test.txt': b' a cat \n',
}
FAKE_MD5 = {k: hashlib.md5(v).hexdigest() for k, v in FAKE.items()}


def md5(b: bytes) -> str:
    return hashlib.md5(b).hexdigest()


def leftovers(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.name.endswith('.part'))


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def served(tmp_path):
    """A real HTTP server on loopback serving a directory the test fills."""
    root = tmp_path / 'www'
    root.mkdir()
    server = http.server.ThreadingHTTPServer(
        ('127.0.0.1', 0), functools.partial(_Quiet, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield root, f'http://127.0.0.1:{server.server_address[1]}/'
    finally:
        server.shutdown()
        server.server_close()


def make_ptb_tgz(path: Path, contents: dict[str, bytes]) -> None:
    """The member layout of Mikolov's simple-examples.tgz, with an extra member to ignore."""
    with tarfile.open(path, 'w:gz') as tar:
        for name, data in [('./simple-examples/data/ptb.char.train.txt', b'x y z\n')] + [
                (f'./simple-examples/data/ptb.{k[:-4]}.txt', v) for k, v in contents.items()]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def ptb_like(sources, files=None) -> DatasetSpec:
    return DatasetSpec('ptb', dict(files or FAKE_MD5), tuple(sources), 'DSRECIPES_DATA')


PTB_MEMBERS = {k: f'./simple-examples/data/ptb.{k[:-4]}.txt' for k in FAKE}


# --- the real data --------------------------------------------------------------------------------

@pytest.mark.parametrize('spec', [PTB, WIKITEXT2], ids=['ptb', 'wikitext-2'])
def test_shared_data_verifies(spec):
    d = SHARED / spec.name
    assert d.is_dir(), f'{d} is missing'
    # both spellings of the root work; the shared dir is read-only, so the md5 cache is skipped
    assert ensure_dataset(SHARED, spec, download=False) == d
    assert ensure_dataset(d, spec, download=False) == d


@pytest.mark.parametrize('spec', [PTB, WIKITEXT2], ids=['ptb', 'wikitext-2'])
def test_spec_md5s_match_shared_md5sums(spec):
    lines = (SHARED / spec.name / 'MD5SUMS').read_text().split('\n')
    sums = dict(reversed(line.split()) for line in lines if line.strip())
    assert sums == spec.files


def test_one_changed_byte_fails_md5(tmp_path):
    d = tmp_path / 'ptb'
    shutil.copytree(SHARED / 'ptb', d)
    for p in d.iterdir():
        p.chmod(0o644)
    data = bytearray((d / 'valid.txt').read_bytes())
    data[1000] ^= 0x01
    (d / 'valid.txt').write_bytes(bytes(data))
    with pytest.raises(DataError) as e:
        ensure_dataset(tmp_path, PTB, download=False)
    msg = str(e.value)
    assert '\n' not in msg
    assert 'valid.txt' in msg and 'md5' in msg and PTB.files['valid.txt'] in msg
    assert (d / 'valid.txt').exists()  # the user's file is never deleted
    assert ensure_dataset(tmp_path, PTB, verify=False, download=False) == d


# --- failures without a network -------------------------------------------------------------------

def dead_spec():
    return ptb_like([Source(DEAD + 'simple-examples.tgz', 'tgz', PTB_MEMBERS)]
                    + [Source(DEAD + k, 'file', {k: k}) for k in FAKE])


@pytest.mark.parametrize('existing', [False, True], ids=['absent', 'empty'])
def test_missing_and_unreachable_fails_fast_in_one_line(tmp_path, existing):
    root = tmp_path / 'data'
    if existing:
        (root / 'ptb').mkdir(parents=True)
    t = time.monotonic()
    with pytest.raises(DataError) as e:
        ensure_dataset(root, dead_spec(), timeout=5)
    assert time.monotonic() - t < 5
    msg = str(e.value)
    assert '\n' not in msg
    assert f'missing in {root / "ptb"} (train.txt, valid.txt, test.txt)' in msg
    assert DEAD + 'simple-examples.tgz' in msg and 'failed' in msg
    assert 'data.root' in msg and '$DSRECIPES_DATA' in msg
    assert (root / 'ptb').is_dir() == existing  # a dir we made for nothing is not left behind
    if existing:
        assert list((root / 'ptb').iterdir()) == []


def test_partial_dir_keeps_user_files(tmp_path):
    d = tmp_path / 'ptb'
    d.mkdir()
    (d / 'train.txt').write_bytes(FAKE['train.txt'])
    with pytest.raises(DataError) as e:
        ensure_dataset(tmp_path, dead_spec())
    assert '(valid.txt, test.txt)' in str(e.value)
    assert (d / 'train.txt').read_bytes() == FAKE['train.txt']
    assert leftovers(d) == []


def test_download_off(tmp_path):
    with pytest.raises(DataError, match='downloading is off'):
        ensure_dataset(tmp_path, dead_spec(), download=False)


def test_resolve_dataset_dir(tmp_path):
    spec = ptb_like([])
    assert resolve_dataset_dir(tmp_path, spec) == tmp_path / 'ptb'
    assert resolve_dataset_dir(tmp_path / 'ptb', spec) == tmp_path / 'ptb'
    for k, v in FAKE.items():
        (tmp_path / k).write_bytes(v)
    assert resolve_dataset_dir(tmp_path, spec) == tmp_path
    assert ensure_dataset(tmp_path, spec, download=False) == tmp_path


# --- real downloads over loopback -----------------------------------------------------------------

def test_fetch_tgz_extracts_and_verifies(served, tmp_path, monkeypatch):
    www, url = served
    make_ptb_tgz(www / 'simple-examples.tgz', FAKE)
    archive_md5 = md5((www / 'simple-examples.tgz').read_bytes())
    spec = ptb_like([Source(DEAD + 'x.tgz', 'tgz', PTB_MEMBERS),
                     Source(url + 'simple-examples.tgz', 'tgz', PTB_MEMBERS, md5=archive_md5)])
    root = tmp_path / 'data'
    d = ensure_dataset(root, spec)
    assert d == root / 'ptb'
    assert sorted(p.name for p in d.iterdir()) == sorted([*FAKE, '.md5-verified.json'])
    for k, v in FAKE.items():
        assert (d / k).read_bytes() == v
    # unchanged files are not hashed again ...
    monkeypatch.setattr(datasets, 'md5_file', lambda p: pytest.fail(f're-hashed {p}'))
    assert ensure_dataset(root, spec) == d
    monkeypatch.undo()
    # ... but a changed one is
    (d / 'test.txt').write_bytes(b' a cow \n')
    with pytest.raises(DataError, match=r'test\.txt fails its md5 check'):
        ensure_dataset(root, spec)


def test_fetch_zip_members_without_dot_prefix(served, tmp_path):
    www, url = served
    members = {k: f'wikitext-2/wiki.{k[:-4]}.tokens' for k in FAKE}
    with zipfile.ZipFile(www / 'wikitext-2-v1.zip', 'w') as zf:
        zf.writestr('wikitext-2/', b'')
        for k, v in FAKE.items():
            zf.writestr(members[k], v)
    spec = DatasetSpec('wikitext-2', dict(FAKE_MD5),
                       (Source(url + 'wikitext-2-v1.zip', 'zip', members),), 'DSRECIPES_DATA')
    d = ensure_dataset(tmp_path, spec)
    assert {k: (d / k).read_bytes() for k in FAKE} == FAKE


def test_wrong_content_never_gets_the_final_name(served, tmp_path):
    www, url = served
    (www / 'train.txt').write_bytes(b' not the real train \n')
    make_ptb_tgz(www / 'bad.tgz', {**FAKE, 'valid.txt': b' tampered \n'})
    spec = ptb_like([Source(url + 'train.txt', 'file', {'train.txt': 'train.txt'}),
                     Source(url + 'bad.tgz', 'tgz', PTB_MEMBERS),
                     Source(url + 'absent.tgz', 'tgz', PTB_MEMBERS)])
    with pytest.raises(DataError) as e:
        ensure_dataset(tmp_path, spec)
    msg = str(e.value)
    assert '\n' not in msg and 'every download failed' in msg and 'HTTP 404' in msg
    assert 'md5' in msg and '(valid.txt)' in msg
    d = tmp_path / 'ptb'
    # the archive's good members are kept; the bad one and the bad single file are not
    assert not (d / 'valid.txt').exists()
    assert (d / 'train.txt').read_bytes() == FAKE['train.txt']
    assert (d / 'test.txt').read_bytes() == FAKE['test.txt']
    assert leftovers(d) == []


def test_wrong_archive_md5_is_rejected(served, tmp_path):
    www, url = served
    make_ptb_tgz(www / 'simple-examples.tgz', FAKE)
    spec = ptb_like([Source(url + 'simple-examples.tgz', 'tgz', PTB_MEMBERS, md5='0' * 32)])
    with pytest.raises(DataError, match='expected 0{32}'):
        ensure_dataset(tmp_path, spec)
    assert not (tmp_path / 'ptb').exists()


def test_truncated_archive_is_a_failed_source(served, tmp_path):
    www, url = served
    make_ptb_tgz(www / 'full.tgz', FAKE)
    (www / 'cut.tgz').write_bytes((www / 'full.tgz').read_bytes()[:60])
    spec = ptb_like([Source(url + 'cut.tgz', 'tgz', PTB_MEMBERS)])
    with pytest.raises(DataError, match='cut.tgz failed'):
        ensure_dataset(tmp_path, spec)
