"""``python -m mtlue_fast.protect RUN --data-root NEW --out OUT``: new images protected with a run's
generator, without training; the run's own images get byte-identical files; bounds, sizes, layout,
``protect.json`` and clear errors."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from mtlue_fast.data import load_records, synthetic
from mtlue_fast.protect import RECORD_FILE, main
from mtlue_fast.run import main as run_main
from mtlue_fast.ue.export import exported_name
from mtlue_fast.ue.publish import MARKER_FILE, decode_original


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory):
    return tmp_path_factory.mktemp("mtlue-cache")


@pytest.fixture(autouse=True)
def _cache_env(cache_root, monkeypatch):
    monkeypatch.setenv("MTLUE_CACHE", str(cache_root))


@pytest.fixture(scope="module")
def finished(tmp_path_factory, cache_root) -> dict:
    """A CelebA-format run (centre crop 140 of 218x178, cache 70x70) with its release at the original size."""
    base = tmp_path_factory.mktemp("protect")
    root = synthetic.write("celeba", base / "celeba", 24, 8, seed=0)
    out = base / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MTLUE_CACHE", str(cache_root))
        code = run_main(["--dataset", "celeba", "--data-root", str(root), "--preset", "smoke", "--device", "cpu",
                         "--out", str(out), "--export-images", "--stages", "prepare,surrogate,generate,export", "--quiet"])
    assert code == 0
    return {"base": base, "root": root, "run": out, "release": out / "protected" / "images"}


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def protect(run: Path, root: Path, out: Path, *extra) -> int:
    return main([str(run), "--data-root", str(root), "--out", str(out), "--device", "cpu", "--quiet", *extra])


def test_the_run_s_own_images_get_the_run_s_files(finished, tmp_path):
    out = tmp_path / "again"
    assert protect(finished["run"], finished["root"], out) == 0
    mine, run = files(out), files(finished["release"])
    assert set(mine) - set(run) == {RECORD_FILE}
    for name, data in run.items():
        if name != MARKER_FILE:
            assert mine[name] == data, name
    record = json.loads((out / RECORD_FILE).read_text())
    generator = finished["run"] / "generator" / "generator.pt"
    assert record["generator"] == {"path": str(generator), "sha256": hashlib.sha256(generator.read_bytes()).hexdigest()}
    assert record["run"] == str(finished["run"].resolve()) and record["data_root"] == str(finished["root"].resolve())
    assert record["splits"]["train"]["count"] == 24 and record["splits"]["test"]["count"] == 8
    assert record["splits"]["test"]["protected"] is False and record["resolution"] == "original"
    stamp = (out / RECORD_FILE).stat().st_mtime_ns
    assert protect(finished["run"], finished["root"], out) == 0  # a rerun changes nothing
    assert (out / RECORD_FILE).stat().st_mtime_ns == stamp


def test_in_other_company_an_image_still_gets_the_same_file(finished, tmp_path):
    """A root holding only some of the run's images (the others removed, so the generator sees the
    rest in other batches) gives those images the run's files byte for byte."""
    root = tmp_path / "fewer"
    shutil.copytree(finished["root"], root)
    rows = load_records("celeba", root, "train").paths
    for path in rows[::3]:
        Path(path).unlink()
    out = tmp_path / "out"
    assert protect(finished["run"], root, out) == 0
    kept = [Path(p).name for i, p in enumerate(rows) if i % 3]
    for name in kept:
        rel = exported_name(f"img_align_celeba/{name}", "png")
        assert (out / rel).read_bytes() == (finished["release"] / rel).read_bytes(), rel


def test_new_images_are_protected_within_the_bound_at_their_size(finished, tmp_path):
    root = synthetic.write("celeba", tmp_path / "new", 10, 4, seed=7)
    out = tmp_path / "out"
    assert protect(finished["run"], root, out) == 0
    records = load_records("celeba", root, "train")
    published = load_records("celeba", out, "train")
    np.testing.assert_array_equal(published.labels, records.labels)
    moved = 0
    for source, target in zip(records.paths, published.paths):
        assert target.endswith(".png")
        original, protected = decode_original(Path(source), 3), decode_original(Path(target), 3)
        assert protected.shape == original.shape == (3, 218, 178)
        diff = np.abs(protected.astype(np.int16) - original)
        assert diff.max() <= 8
        assert diff[:, :39].max() == 0 and diff[:, 39 + 140 :].max() == 0  # outside the 140x140 centre crop
        moved = max(moved, int(diff.max()))
    assert moved > 0
    for path in load_records("celeba", root, "test").paths:
        rel = Path(path).relative_to(root)
        assert (out / rel).read_bytes() == Path(path).read_bytes()
    assert json.loads((out / MARKER_FILE).read_text())["max_abs_diff_levels"] <= 8


def test_working_resolution_and_jpeg(finished, tmp_path):
    root = synthetic.write("celeba", tmp_path / "new", 6, 2, seed=3)
    assert protect(finished["run"], root, tmp_path / "w", "--resolution", "working") == 0
    for path in load_records("celeba", tmp_path / "w", "train").paths:
        assert decode_original(Path(path), 3).shape == (3, 70, 70)
    with pytest.warns(UserWarning, match="weakens"):
        assert protect(finished["run"], root, tmp_path / "j", "--image-format", "jpeg") == 0
    marker = json.loads((tmp_path / "j" / MARKER_FILE).read_text())
    assert marker["jpeg"]["max_abs_change_after_decode"] >= 0 and marker["image_format"] == "jpeg"


def test_clear_errors(finished, tmp_path, capsys):
    def error(*args) -> str:
        assert protect(*args) == 2
        return capsys.readouterr().err

    assert "does not exist" in error(tmp_path / "nowhere", finished["root"], tmp_path / "o")
    assert "not a python -m mtlue_fast.run directory" in error(tmp_path, finished["root"], tmp_path / "o")
    assert "--data-root" in error(finished["run"], tmp_path / "nowhere", tmp_path / "o")
    assert "inside --data-root" in error(finished["run"], finished["root"], finished["root"] / "out")
    other = tmp_path / "xray"
    synthetic.write("chestxray", other, 6, 2, seed=0, size=(32, 32))
    assert "celeba" in error(finished["run"], other, tmp_path / "o")  # the run's dataset's layout is expected
    broken = tmp_path / "run"
    shutil.copytree(finished["run"], broken, ignore=shutil.ignore_patterns("images", "*.npy"))
    (broken / "generator" / "generator.pt").unlink()
    assert "no trained generator" in error(broken, finished["root"], tmp_path / "o")
    text = (broken / "config.yaml").read_text().replace("method: mtlue", "method: random")
    (broken / "config.yaml").write_text(text)
    assert "only an mtlue run" in error(broken, finished["root"], tmp_path / "o")
    assert not (tmp_path / "o").exists()
