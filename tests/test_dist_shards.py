"""Work sharded over gloo ranks. The cache build: every rank decodes a share of the chunks, rank 0
assembles; the entry equals a single process's byte for byte (a corrupt file skipped and counted),
and an interrupted build resumes with another number of processes, decoding only what is missing.
The image files of an export: every rank writes blocks of rows, rank 0 adds the annotations; the
folder equals the one a single process writes, file for file."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from test_cache import CountingDecoder, write_mini_celeba  # noqa: E402
from test_dist import spawn  # noqa: E402

from mtlue_fast.data import build_cache  # noqa: E402

N = 23  # training images: 8 chunks of 3, the last one short
CHUNK = 3


def _dataset(tmp_path: Path) -> Path:
    root = write_mini_celeba(tmp_path / "celeba", n=N)
    (root / "img_align_celeba" / "000005.jpg").write_bytes(b"not a jpeg")  # row 4: skipped and counted
    return root


class _Stopping(CountingDecoder):
    """Counts decoded files (written to ``counts/rank<r>`` at every chunk) and can stop this rank."""

    def __init__(self, record: Path, stop_after: int | None = None):
        super().__init__(fail_after_chunks=stop_after)
        self.record = record

    def decode(self, paths, resize):
        out = super().decode(paths, resize)
        self.record.write_text(str(self.files))
        return out


def _build_job(rank: int, root: str, cache: str, counts: str, stop_after: int | None) -> None:
    decoder = _Stopping(Path(counts) / f"rank{rank}", stop_after)
    try:
        build_cache("celeba", root, "train", cache, decoder=decoder, chunk_size=CHUNK, progress=False)
    except KeyboardInterrupt:  # the simulated interruption: this rank stops, as a killed job would
        pass


def _files(counts: Path) -> int:
    return sum(int(p.read_text()) for p in counts.glob("rank*"))


def _entry(cache: Path) -> Path:
    (entry,) = [p for p in cache.iterdir() if p.is_dir()]
    return entry


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_build_equals_one_process(tmp_path, world):
    root = _dataset(tmp_path)
    one = build_cache("celeba", root, "train", tmp_path / "one", decoder="pil", chunk_size=CHUNK, progress=False)
    counts = tmp_path / "counts"
    counts.mkdir()
    spawn(_build_job, str(root), str(tmp_path / "many"), str(counts), None, world=world)
    entry = _entry(tmp_path / "many")
    assert _files(counts) == N  # every image decoded once, by one rank
    assert (entry / "images.npy").read_bytes() == (one.path / "images.npy").read_bytes()
    assert (entry / "labels.npy").read_bytes() == (one.path / "labels.npy").read_bytes()
    manifest = json.loads((entry / "manifest.json").read_text())
    assert manifest["count"] == N - 1 == len(one)
    assert manifest["skipped"]["counts"]["undecodable_images"] == 1
    assert manifest["row_files"] == one.manifest["row_files"]
    assert not list(entry.glob("progress*.json")) and not list(entry.glob("*.partial.npy"))


@pytest.mark.parametrize("resumed_with", [1, 3])
def test_interrupted_sharded_build_resumes_with_another_process_count(tmp_path, resumed_with):
    root = _dataset(tmp_path)
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    spawn(_build_job, str(root), str(tmp_path / "cache"), str(first), 1, world=2)  # each rank: 1 chunk, then stops
    entry = _entry(tmp_path / "cache")
    assert not (entry / "manifest.json").exists() and _files(first) == 2 * CHUNK
    if resumed_with == 1:
        _build_job(0, str(root), str(tmp_path / "cache"), str(second), None)
    else:
        spawn(_build_job, str(root), str(tmp_path / "cache"), str(second), None, world=resumed_with)
    assert _files(second) == N - 2 * CHUNK  # only the chunks not done before
    one = build_cache("celeba", root, "train", tmp_path / "one", decoder="pil", chunk_size=CHUNK, progress=False)
    assert (entry / "images.npy").read_bytes() == (one.path / "images.npy").read_bytes()
    manifest = json.loads((entry / "manifest.json").read_text())
    assert manifest["skipped"]["counts"]["undecodable_images"] == 1 and manifest["count"] == N - 1


def _files_job(rank: int, protected: str, root: str, out: str) -> None:
    from mtlue_fast.ue import publish

    publish.FILE_BLOCK = 4  # several blocks per rank with this small set
    publish.write_image_files(protected, root, out, progress=False)


@pytest.mark.parametrize("world", [2, 3])
def test_image_files_written_by_several_ranks_equal_one_process(tmp_path, world):
    from test_export import export_random

    from mtlue_fast.ue.publish import MARKER_FILE, write_image_files

    root = _dataset(tmp_path)
    clean = build_cache("celeba", root, "train", tmp_path / "cache", decoder="pil", progress=False)
    protected = export_random(clean, tmp_path / "protected")
    one = write_image_files(protected, root, tmp_path / "one", progress=False)
    spawn(_files_job, str(protected.path), str(root), str(tmp_path / "many"), world=world)
    many = tmp_path / "many"
    names = sorted(str(p.relative_to(one)) for p in one.rglob("*") if p.is_file())
    assert names == sorted(str(p.relative_to(many)) for p in many.rglob("*") if p.is_file())
    for name in names:
        if name != MARKER_FILE:
            assert (one / name).read_bytes() == (many / name).read_bytes(), name
    assert not [p for p in tmp_path.iterdir() if ".partial" in p.name]
