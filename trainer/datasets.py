"""Find a dataset on disk, or fetch it, and prove it is the right bytes.

Runs are only comparable when every run trains on byte-identical data, so every file is checked
against a known md5; a mismatch is a user-facing `DataError`, never a silent retrain on other data.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Literal

from trainer.errors import DataError

log = logging.getLogger(__name__)

CACHE_NAME = '.md5-verified.json'
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Source:
    """One place the files can come from; `members` maps local file name -> path inside it."""

    url: str
    kind: Literal['file', 'tgz', 'zip']
    members: dict[str, str] = field(hash=False)
    md5: str | None = None


@dataclass(frozen=True)
class DatasetSpec:
    """What a complete dataset directory holds (`files`: name -> md5) and where to get it."""

    name: str
    files: dict[str, str] = field(hash=False)
    sources: tuple[Source, ...] = ()
    env_hint: str = 'DSRECIPES_DATA'
    title: str = ''  # how messages name the dataset ('PTB'); defaults to `name`

    @property
    def label(self) -> str:
        return self.title or self.name


class _SourceFailed(Exception):
    """A source that answered but gave the wrong thing; the next source is tried."""


def resolve_dataset_dir(root: str | Path, spec: DatasetSpec) -> Path:
    """Accept both `data/` and `data/ptb/` as the root, so either spelling of data.root works."""
    root = Path(root)
    if root.name == spec.name or all((root / f).is_file() for f in spec.files):
        return root
    return root / spec.name


def ensure_dataset(root: str | Path, spec: DatasetSpec, verify: bool = True, download: bool = True,
                   timeout: float = 30.0) -> Path:
    """Return the directory with all of `spec.files`, fetching the missing ones first.

    Files already there are never overwritten or deleted. Downloaded files are always checked
    against their md5 before they get their final name (cheap: hashed while written); `verify`
    controls the check of files that were already present.
    """
    d = resolve_dataset_dir(root, spec)
    missing = [f for f in spec.files if not (d / f).is_file()]
    fixed = (f'put the files there or set data.root (or ${spec.env_hint}) '
             f'to a directory that has them')
    where = f'{spec.label} data missing in {d} ({", ".join(missing)})'
    verified: dict[str, str] = {}
    if missing:
        if not download:
            raise DataError(f'{where} and downloading is off; {fixed}')
        created = not d.exists()
        try:
            d.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise DataError(f'{where} and {d} cannot be created ({_reason(e)}); {fixed}') from None
        failures = []
        for src in spec.sources:
            wanted = [f for f in missing if f in src.members and not (d / f).is_file()]
            if not wanted:
                continue
            try:
                verified.update(_fetch(src, wanted, d, spec.files, timeout))
            except (OSError, ValueError, EOFError, zlib.error, tarfile.TarError,
                    zipfile.BadZipFile, _SourceFailed) as e:
                failures.append((src.url, _reason(e)))
        still = [f for f in missing if not (d / f).is_file()]
        if still:
            if created:
                _rmdir_if_empty(d)
            where = f'{spec.label} data missing in {d} ({", ".join(still)})'
            if not failures:
                raise DataError(f'{where} and no download source provides them; {fixed}')
            by_reason: dict[str, list[str]] = {}
            for url, why in failures:
                by_reason.setdefault(why, []).append(url)
            if len(by_reason) == 1:
                ((why, urls),) = by_reason.items()
                s = 's' if len(urls) > 1 else ''
                raise DataError(f'{where} and the download{s} from {", ".join(urls)} failed ({why}); '
                                f'{fixed}')
            tried = '; '.join(f'{", ".join(urls)}: {why}' for why, urls in by_reason.items())
            raise DataError(f'{where} and every download failed ({tried}); {fixed}')
    if verify or verified:
        _verify(d, spec.files if verify else {}, verified)
    return d


def _reason(e: BaseException) -> str:
    """One line for the user, whatever the exception kind."""
    if isinstance(e, urllib.error.HTTPError):
        text = f'HTTP {e.code} {e.reason}'
    elif isinstance(e, urllib.error.URLError):
        text = str(e.reason)
    elif isinstance(e, TimeoutError):
        text = 'timed out'
    else:
        text = str(e) or type(e).__name__
    return ' '.join(text.split())


def _fetch(src: Source, wanted: list[str], d: Path, md5s: dict[str, str],
           timeout: float) -> dict[str, str]:
    """Install `wanted` from one source; returns name -> md5 of the files it installed."""
    log.info('downloading %s', src.url)
    fd, tmp = tempfile.mkstemp(dir=d, prefix='.download.', suffix='.part')
    try:
        with os.fdopen(fd, 'wb') as out, urllib.request.urlopen(src.url, timeout=timeout) as resp:
            got = _copy(resp, out)
        if src.md5 and got != src.md5:
            raise _SourceFailed(f'got md5 {got}, expected {src.md5}')
        if src.kind == 'file':
            (name,) = wanted
            with open(tmp, 'rb') as f:
                return _install(f, name, d, md5s)
        if src.kind == 'tgz':
            with tarfile.open(tmp, 'r:*') as tar:
                index = {_norm(m.name): m for m in tar.getmembers() if m.isfile()}
                return _install_members(wanted, src, index, tar.extractfile, d, md5s)
        if src.kind == 'zip':
            with zipfile.ZipFile(tmp) as zf:
                index = {_norm(n): n for n in zf.namelist() if not n.endswith('/')}
                return _install_members(wanted, src, index, zf.open, d, md5s)
        raise _SourceFailed(f'unknown source kind {src.kind!r}')
    finally:
        _unlink_quietly(tmp)


def _install_members(wanted, src, index, opener, d, md5s) -> dict[str, str]:
    """Keep every good member even when another is bad, so a retry has less to fetch."""
    done, bad = {}, []
    for name in wanted:
        member = index.get(_norm(src.members[name]))
        if member is None:
            bad.append(f'the archive has no {src.members[name]}')
            continue
        try:
            with opener(member) as f:
                done.update(_install(f, name, d, md5s))
        except _SourceFailed as e:
            bad.append(str(e))
    if bad:
        raise _SourceFailed(', '.join(bad))
    return done


def _norm(member: str) -> str:
    """Archives list names as './a/b' or 'a/b'; both mean the same member."""
    while member.startswith('./'):
        member = member[2:]
    return member.lstrip('/')


def _copy(src: BinaryIO, out: BinaryIO) -> str:
    h = hashlib.md5()
    while chunk := src.read(_CHUNK):
        h.update(chunk)
        out.write(chunk)
    return h.hexdigest()


def _install(f: BinaryIO, name: str, d: Path, md5s: dict[str, str]) -> dict[str, str]:
    """Write to a temp name and rename only once the md5 matches: no partial or wrong final file."""
    fd, tmp = tempfile.mkstemp(dir=d, prefix=f'.{name}.', suffix='.part')
    try:
        with os.fdopen(fd, 'wb') as out:
            got = _copy(f, out)
        want = md5s.get(name)
        if want and got != want:
            raise _SourceFailed(f'its {name} has md5 {got}, expected {want}')
        final = d / name
        if final.exists():  # another process got there first; keep its file
            return {}
        os.chmod(tmp, 0o644 & ~_umask())
        os.replace(tmp, final)
        return {name: got}
    finally:
        _unlink_quietly(tmp)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _rmdir_if_empty(d: Path) -> None:
    """Undo our own mkdir after a failed fetch; rmdir refuses non-empty dirs, so no user file goes."""
    try:
        d.rmdir()
    except OSError:
        pass


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def md5_file(path: str | Path) -> str:
    h = hashlib.md5()
    with open(path, 'rb') as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _verify(d: Path, expected: dict[str, str], fresh: dict[str, str]) -> None:
    """Check md5s, skipping files whose (size, mtime_ns) match an earlier successful check.

    `fresh` holds files just downloaded and already hashed; they only enter the cache.
    The cache is best effort: a read-only data directory just means re-hashing every time.
    """
    cache_path = d / CACHE_NAME
    try:
        cache = json.loads(cache_path.read_text())
        if not isinstance(cache, dict):
            cache = {}
    except (OSError, ValueError):
        cache = {}
    changed = False
    for name, want in {**fresh, **expected}.items():
        path = d / name
        st = path.stat()
        entry = cache.get(name)
        if (isinstance(entry, dict) and entry.get('size') == st.st_size
                and entry.get('mtime_ns') == st.st_mtime_ns and entry.get('md5') == want):
            continue
        got = fresh[name] if name in fresh else md5_file(path)
        if got != want:
            raise DataError(f'{path} fails its md5 check (expected {want}, got {got}): delete it to '
                            f'download it again, or replace it with the original file')
        cache[name] = {'size': st.st_size, 'mtime_ns': st.st_mtime_ns, 'md5': got}
        changed = True
    if changed:
        try:
            fd, tmp = tempfile.mkstemp(dir=d, prefix='.md5-verified.', suffix='.part')
            try:
                with os.fdopen(fd, 'w') as out:
                    json.dump(cache, out, indent=1, sort_keys=True)
                os.replace(tmp, cache_path)
            finally:
                _unlink_quietly(tmp)
        except OSError:
            pass
