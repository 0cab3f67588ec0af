"""Results over run seeds: runs grouped by their config less the seed, pooled, and compared seed by seed.

The run folders here hold what `distill` and `evaluate` write (a manifest with the run's config, eval/*.json by
evaluate's own writer) with accuracies chosen by the test, so the expected numbers are computed by hand below."""
import json

import torch

from lgd_ray.config import load_config, to_dict
from lgd_ray.distill import per_seed
from lgd_ray.evaluate import summarise, write_results
from lgd_ray.redundancy import redundancy_of
from lgd_ray.report import compare
from lgd_ray.pooling import collect, paired, stages_table
from lgd_ray.shards import write_manifest
from lgd_ray.storage import as_location

# last-epoch accuracies (%) of two evaluation models per run seed; best = last + 1
RANKED = {0: [80, 82], 1: [84, 86], 2: [78, 80]}  # lgd, kappa 3: seed means 81, 85, 79
GRADIENT_ONLY = {0: [79, 79], 1: [82, 84], 2: [77, 79]}  # lgd, kappa 1: seed means 79, 83, 78


def _run(folder, overrides: list[str], seed: int, accs: list[float], stages: dict | None = None) -> str:
    cfg = load_config("digits", overrides + [f"seed={seed}", f"out={folder}"])
    run = as_location(str(folder))
    write_manifest(run, {"config": to_dict(cfg), "stages": stages or {}, "shards": []})
    rows = [{"seed": i, "last": a / 100, "best": (a + 1) / 100, "best_epoch": 10} for i, a in enumerate(accs)]
    write_results(run / "eval", "convnet2-ipc20-hard", {"method": "lgd", "model": "convnet2", "ipc": 20,
                                                       "labels": "hard", "config_hash": "", "epochs": 30, "seconds": 1.0,
                                                       **summarise(rows),
                                                       "repeats": rows})
    return str(folder)


def test_pooled_and_paired_by_hand(tmp_path):
    runs = [_run(tmp_path / f"k3-s{s}", [], s, a) for s, a in RANKED.items()]
    runs += [_run(tmp_path / f"k1-s{s}", ["guidance.kappa=1"], s, a) for s, a in GRADIENT_ONLY.items()]
    groups = {g.label: g for g in collect(runs)}
    assert set(groups) == {"lgd guidance.kappa=3", "lgd guidance.kappa=1"}
    ranked, gradient = groups["lgd guidance.kappa=3"], groups["lgd guidance.kappa=1"]
    assert sorted(ranked.by_seed) == [0, 1, 2]
    # pooled over 3 seeds x 2 models: mean 490/6; squared deviations sum to 43.333 -> std sqrt(43.333 / 5)
    mean, std = ranked.pooled(0)
    assert abs(mean - 81.6667) < 1e-3 and abs(std - 2.9439) < 1e-3
    assert abs(ranked.pooled(1)[0] - 82.6667) < 1e-3
    # per-seed differences 2, 2, 1: mean 1.6667, sd sqrt(1/3), t(0.975, 2) = 4.3027 -> half width 1.4342
    m, lo, hi, n = paired(ranked.seed_means(0), gradient.seed_means(0))
    assert n == 3 and abs(m - 1.6667) < 1e-3 and abs(lo - 0.2324) < 1e-3 and abs(hi - 3.1009) < 1e-3
    assert paired({0: 1.0}, {0: 0.0}) is None  # one common seed: no interval
    table = compare(runs)
    assert "## Over run seeds" in table and "### digits: convnet2, hard labels" in table and "81.67 ± 2.94" in table
    assert "| 20 | lgd guidance.kappa=3 | lgd guidance.kappa=1 | 3 | +2.00, +2.00, +1.00 | +1.67 [+0.23, +3.10] |" in table


def test_the_incremental_student_pooled_by_hand(tmp_path):
    """Stage rows from the manifests, pooled over seeds; a run with a stage not yet trained is left out."""
    stage = lambda acc, s, trained=True: {"trained": trained, "student_acc": acc, "mean_S": s}
    one = ["distill.stages=1"]  # the seed increment and one guided stage
    runs = [_run(tmp_path / f"s{seed}", one, seed, [80, 80], {"0": stage(0.60, None), "1": stage(a, s)})
            for seed, a, s in ((0, 0.70, 2.0), (1, 0.74, 1.0))]
    runs.append(_run(tmp_path / "s2", one, 2, [80, 80], {"0": stage(0.62, None), "1": stage(0.9, 9.0, False)}))
    runs += [_run(tmp_path / f"k1-s{seed}", one + ["guidance.kappa=1"], seed, [80, 80],
                  {"0": stage(0.60, None), "1": stage(0.70, 1.0)}) for seed in (0, 1)]
    for seed, off in ((0, 0.9), (1, 0.8)):  # what `python -m lgd_ray.redundancy` writes, for two increments
        matrix = [[1.0, off], [off, 1.0]]
        result = {"method": "lgd", "model": "convnet2", "epochs": [30, 30], "stages": [0, 1], "matrix": matrix,
                  "redundancy": redundancy_of(torch.tensor(matrix)), "real_test": [0.6, 0.7], "seeds": [0, 1]}
        (as_location(runs[-2 + seed]) / "redundancy" / "redundancy.json").write_text(json.dumps(result))
    rows = stages_table(runs).splitlines()
    assert rows[2] == ("| digits | lgd guidance.kappa=1 | 0,1 | 60.00 ± 0.00 | 70.00 ± 0.00 | – | 1.000 "
                       "| 85.00 ± 7.07 (2 seeds) |")
    # kappa 3: seed 2's stage 1 is not trained, so seeds 0-1 only: stage 1 70 and 74 -> 72 ± 2.83, mean S 1.5
    assert rows[3] == "| digits | lgd guidance.kappa=3 | 0,1 | 60.00 ± 0.00 | 72.00 ± 2.83 | – | 1.500 | – |"
    assert len(rows) == 6 and "### The incremental student over run seeds" in compare(runs)


def test_per_seed_runs_get_their_own_folders():
    cfg = load_config("digits", ["out=s3://bucket/runs/digits?scheme=http&endpoint_override=127.0.0.1:1"])
    runs = per_seed(cfg, [0, 3])
    assert [c.seed for c in runs] == [0, 3]
    assert [c.out for c in runs] == [f"s3://bucket/runs/digits/seed{s}?scheme=http&endpoint_override=127.0.0.1:1"
                                     for s in (0, 3)]  # the store's options stay in the query
    assert per_seed(cfg, None) == [cfg]


def test_seeds_flag_parses_a_comma_list_beside_overrides(capsys):
    import pytest

    from lgd_ray.distill import main

    main(["digits", "--seeds", "0,2", "--dry-run", "distill.method=random", "out=runs/x"])
    out = capsys.readouterr().out
    assert out.count("out: ") == 2 and "runs/x/seed0" in out and "runs/x/seed2" in out
    with pytest.raises(SystemExit):
        main(["digits", "--seeds", "0,0", "--dry-run"])
    assert "distinct" in capsys.readouterr().err


def test_a_stage_plan_that_differs_is_one_label(tmp_path):
    """Groups of one method whose stage plans differ are told apart by one `stages=SEED+STAGESxIPC` word."""
    plan = ["distill.seed_ipc=4", "distill.ipc_per_stage=2", "distill.stages=3"]
    runs = [_run(tmp_path / f"a{s}", [], s, [80]) for s in (0, 1)]
    runs += [_run(tmp_path / f"b{s}", plan + ["guidance.kappa=1"], s, [81]) for s in (0, 1)]
    cfg = load_config("digits", [])
    default = f"stages={cfg.distill.seed_ipc}+{cfg.distill.stages}x{cfg.distill.ipc_per_stage}"
    assert {g.label for g in collect(runs)} == {f"lgd {default} guidance.kappa=3", "lgd stages=4+3x2 guidance.kappa=1"}
