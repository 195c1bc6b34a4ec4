"""The run command under torchrun on a real-format ChestX-ray14 folder (the sample's 1024x1024 PNGs,
copied under new names until the cache build outlasts the collective timeout):

- ``MTLUE_DIST_TIMEOUT=2 torchrun --nproc-per-node 2 -m mtlue_fast.run --dataset chestxray
  --data-root ROOT --preset smoke`` finishes, although building the caches takes longer than 2 s;
- a run started with one process resumes with two (and the other way round), keeping the stages
  that finished.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

SAMPLE = "chestxray14"
N_TRAIN, N_TEST = 512, 128  # the smoke preset keeps at most 512 / 128 of a real dataset


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_chestxray_copies(sample: Path, root: Path, n_train: int = N_TRAIN, n_test: int = N_TEST) -> Path:
    """A ChestX-ray14 folder of ``n_train + n_test`` real PNGs: the sample's images under new names
    (one patient each; hard links to one copy of each sample image), their findings cycled, with the
    release's CSV and split lists."""
    header, *rows = (sample / "Data_Entry_2017_v2020.csv").read_text().strip().splitlines()
    rows = [r.split(",") for r in rows]
    (root / "images").mkdir(parents=True)
    findings = [r[1] for r in rows] + ["Effusion|Infiltration", "No Finding", "Atelectasis", "Mass|Nodule"]
    lines, train, test = [header], [], []
    originals = root / "originals"
    originals.mkdir()
    for row in rows:
        shutil.copyfile(sample / "images" / row[0], originals / row[0])
    for i in range(n_train + n_test):
        source = rows[i % len(rows)]
        name = f"{i + 1:08d}_000.png"
        os.link(originals / source[0], root / "images" / name)
        lines.append(",".join([name, findings[i % len(findings)], "0", str(i + 1), *source[4:]]))
        (train if i < n_train else test).append(name)
    (root / "Data_Entry_2017_v2020.csv").write_text("\n".join(lines) + "\n")
    (root / "train_val_list.txt").write_text("\n".join(train) + "\n")
    (root / "test_list.txt").write_text("\n".join(test) + "\n")
    return root


@pytest.fixture(scope="module")
def chestxray_root(samples, tmp_path_factory) -> Path:
    return make_chestxray_copies(samples / SAMPLE, tmp_path_factory.mktemp("data") / "chestxray14")


def _run(args: list[str], cache: Path, processes: int, timeout_s: float = 600, dist_timeout: str = "60") -> subprocess.CompletedProcess:
    env = {**os.environ, "MTLUE_CACHE": str(cache), "MTLUE_DIST_TIMEOUT": dist_timeout}
    env.pop("OMP_NUM_THREADS", None)  # torchrun sets 1 per process; one process keeps the default
    if processes == 1:
        command = [sys.executable, "-m", "mtlue_fast.run", *args]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes),
                   "--master-port", str(_free_port()), "-m", "mtlue_fast.run", *args]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout_s)
    assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return done


def test_torchrun_smoke_on_real_files_outlasting_the_collective_timeout(chestxray_root, tmp_path):
    out = tmp_path / "run"
    args = ["--dataset", "chestxray", "--data-root", str(chestxray_root), "--preset", "smoke", "--out", str(out), "--quiet"]
    _run(args, tmp_path / "cache", processes=2, dist_timeout="2")
    stages = json.loads((out / "stages.json").read_text())
    assert stages["prepare"]["seconds"] > 2, stages["prepare"]  # the cache build outlasted the 2 s timeout
    report = json.loads((out / "report.json").read_text())
    assert report["clean"]["mean"] == report["clean"]["mean"]  # a number, not NaN


@pytest.mark.parametrize("first, then", [pytest.param(1, 2, marks=pytest.mark.slow), (2, 1)])
def test_a_run_resumes_with_another_process_count(chestxray_root, tmp_path, first, then):
    out = tmp_path / "run"
    args = ["--dataset", "chestxray", "--data-root", str(chestxray_root), "--preset", "smoke", "--out", str(out)]
    _run([*args, "--stages", "surrogate,generate"], tmp_path / "cache", processes=first)
    before = json.loads((out / "stages.json").read_text())
    resumed = _run(args, tmp_path / "cache", processes=then)
    after = json.loads((out / "stages.json").read_text())
    for stage in ("surrogate", "generate"):
        assert after[stage] == before[stage], stage  # kept, not redone
        assert f"{stage}: skipped, finished earlier" in resumed.stderr + resumed.stdout
    assert {"export", "victim", "report"} <= set(after)
