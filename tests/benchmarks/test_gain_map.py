"""``python -m benchmarks.gain_map``: gains are paired by seed, the extra settings run only where
the default's gain is not clear or has faded, the report lists worse and incomplete cells, and a map resumes
from its rows and from runs on disk without training anything twice."""

from __future__ import annotations

import json
import math

import pytest

from benchmarks import gain_map as gm


def _row(setting: str, seed: int, acc: float, em: int = 100, forgetting: float = 10.0) -> dict:
    return {"benchmark": "split-mnist", "stream": 1000, "em": em, "method": "er", "seed": seed, "setting": setting,
            "final_avg_accuracy": acc, "forgetting": forgetting, "task_il_accuracy": 90.0, "train_s": 1.0,
            "steps": 10, "swapped_in": 5, "class_order": list(range(10))}


def test_gain_is_paired_by_seed_and_worse_cells_are_listed() -> None:
    rows = [_row("ram", 0, 70.0), _row("ram", 1, 80.0), _row("ram", 2, 60.0),
            _row("carousel", 0, 72.0), _row("carousel", 1, 83.0), _row("carousel", 2, 61.0),
            # seed 2 of ratio 1.0 has no ram partner in this cell... it does: only 0 and 1 ran
            _row("carousel-ratio1", 0, 65.0), _row("carousel-ratio1", 1, 74.0),
            _row("ram", 0, 90.0, em=500), _row("carousel", 0, 89.0, em=500)]
    cells = gm.summarise(rows)["cells"]
    assert [c["em"] for c in cells] == [100, 500]
    car = cells[0]["settings"]["carousel"]
    assert car["gains"] == [2.0, 3.0, 1.0] and car["wins"] == 3 and car["clear"]
    assert car["gain"][0] == pytest.approx(2.0) and car["gain"][1] == pytest.approx(1.0)
    assert cells[0]["share_pct"] == pytest.approx(1.0)     # 100 of 10 x 1,000
    r1 = cells[0]["settings"]["carousel-ratio1"]
    assert r1["paired"] == [0, 1] and r1["gains"] == [-5.0, -6.0] and not r1["clear"]
    worse = gm.worse(cells)
    assert len(worse) == 1 and "carousel-ratio1" in worse[0] and "EM 100" in worse[0]
    missing = gm.incomplete(cells, 3)
    assert any("EM 100: carousel-ratio1 has 2" in m for m in missing)
    assert any("EM 500: ram has 1" in m for m in missing) and any("EM 500: carousel has 1" in m for m in missing)
    assert not any("EM 100: carousel has" in m for m in missing)
    planned = gm.incomplete(cells, 3, [("split-mnist", "er", 1000, 100), ("split-mnist", "er", 6000, 50)])
    assert "split-mnist er stream 6000/class EM 50: no run yet" in planned


def test_clear_gain_needs_a_point_and_more_than_the_spread() -> None:
    assert gm.clear_gain([14.0, 14.3, 13.8])
    assert not gm.clear_gain([0.5, 0.6, 0.4])          # under one point
    assert not gm.clear_gain([6.0, -4.0, 1.0])         # mean 1 but the spread is 5
    assert not gm.clear_gain([])


def test_extras_want_an_unclear_or_faded_gain() -> None:
    assert not gm.wants_extras([14.0, 14.3, 13.8])
    assert gm.wants_extras([1.4, 2.2, 0.6])            # clear (mean 1.4 > std 0.8) but faded
    assert gm.wants_extras([6.0, -4.0, 1.0])           # not clear


def test_extras_run_only_where_the_default_shows_no_clear_gain() -> None:
    cell = ("split-mnist", "er", 1000, 100)

    def rows(gains: list[float]) -> dict:
        out = {}
        for s, g in enumerate(gains):
            for setting, acc in (("ram", 70.0), ("carousel", 70.0 + g)):
                r = _row(setting, s, acc)
                out[gm._key(r)] = r
        return out

    assert gm.extras_for(cell, rows([5.0, 6.0, 5.5]), [0, 1, 2], "auto") == []
    wanted = gm.extras_for(cell, rows([0.2, -1.0, 0.5]), [0, 1, 2], "auto")
    assert sorted({k.setting for k in wanted}) == ["carousel-balanced", "carousel-ratio1"] and len(wanted) == 6
    assert len(gm.extras_for(cell, rows([5.0, 6.0, 5.5]), [0, 1, 2], "all")) == 6
    assert gm.extras_for(cell, rows([0.2, -1.0, 0.5]), [0, 1, 2], "none") == []
    incomplete = rows([0.2, -1.0])           # seed 2 has not run yet: wait for it
    assert gm.extras_for(cell, incomplete, [0, 1, 2], "auto") == []


def test_a_small_map_runs_reports_and_resumes(tmp_path, capsys) -> None:
    out, work = tmp_path / "out", tmp_path / "work"
    args = ["--benchmarks", "generated", "--methods", "er", "--ems", "20", "--streams", "30", "--seeds", "0",
            "--extras", "all", "--jobs", "2", "--eval-limit", "50", "--workdir", str(work), "--out", str(out)]
    data = gm.main(args)
    settings = sorted((r["setting"], r["seed"]) for r in data["runs"])
    assert settings == sorted((s, seed) for s in gm.SETTINGS for seed in (0,))
    (cell,) = data["cells"]
    assert cell["share_pct"] == pytest.approx(100 * 20 / 300)
    for name in gm.EXTRAS + ("carousel",):
        entry = cell["settings"][name]
        assert entry["paired"] == [0] and math.isfinite(entry["gain"][0])
    # The balanced runs really ran carm_balanced, the ratio-1 runs ratio 1.0.
    balanced = json.loads((work / "generated/er/n30/em20/carousel-balanced-s0/result.json").read_text())
    assert "carm" in balanced["memory"]["describe"] and balanced["config"]["profile"].endswith(".toml")
    assert "carm_balanced" in open(balanced["config"]["profile"]).read()
    ratio1 = json.loads((work / "generated/er/n30/em20/carousel-ratio1-s0/result.json").read_text())
    assert ratio1["memory"]["stats"]["swap_ratio"] == 1.0
    md = (out / "gain-map.md").read_text()
    assert "| er | 30 | 20 |" in md and "carousel-ratio1 has 1" in md   # 1 seed < the default 3
    assert (out / "gain-map.png").stat().st_size > 1000

    # Resume: nothing runs again, from the rows or, with the rows gone, from the runs on disk.
    capsys.readouterr()
    again = gm.main(args)
    assert "0 runs to go" in capsys.readouterr().out and again["runs"] == data["runs"]
    (out / "gain-map.json").unlink()
    adopted = gm.main(args)
    assert "0 runs to go" in capsys.readouterr().out and len(adopted["runs"]) == 4
    # A map never mixes runs made with other common settings.
    with pytest.raises(SystemExit, match="give another --out"):
        gm.main([*args[:-4], "--eval-limit", "60", "--workdir", str(work), "--out", str(out)])
