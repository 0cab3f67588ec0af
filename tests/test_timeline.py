"""The run's timeline (lgd_ray/timeline.py): held and busy resource-hours from spans, and the timeline of a real run
in this process (the Ray runs' timelines are checked in tests/test_ray.py)."""
import pytest

from lgd_ray.storage import Location
from lgd_ray.timeline import BUSY, read_timeline, span, usage, usage_table


def _node(node, cpus, t0, t1):
    return [span("node", t, t, who=node, node=node, resources={"CPU": cpus}) for t in (t0, t1)]


def test_busy_is_capped_by_the_node_and_held_is_every_slot_while_up():
    rows = [span("setup", 0, 10, who="driver", node="h"), span("sample", 10, 100, who="driver", node="h")]
    rows += _node("a", 2, 0, 100) + _node("b", 1, 0, 100)
    # on a: two 1-CPU chunks overlapping for 10 s, and a 2-CPU fit overlapping one of them: never more than 2 CPUs
    rows += [span("chunk", 10, 30, who="x", node="a", resources={"CPU": 1}),
             span("chunk", 20, 40, who="y", node="a", resources={"CPU": 1}),
             span("fit", 35, 45, who="w", node="a", resources={"CPU": 2}),
             span("actor_start", 0, 10, who="x", node="a", resources={"CPU": 1}),  # held, not busy
             span("chunk", 50, 60, who="z", node="b", resources={"CPU": 1, "GPU": 0, "accelerator_type:H100": 0.001})]
    u = usage(rows)
    assert u["resource"] == "CPU" and u["wall_s"] == 100
    assert u["held"] * 3600 == pytest.approx(300)
    # a: 10-20 one, 20-30 two, 30-35 one, 35-40 capped at two, 40-45 two -> 10 + 20 + 5 + 10 + 10 = 55; b: 10
    assert u["busy"] * 3600 == pytest.approx(65)
    window = usage(rows, 20, 40)  # a window: held and busy inside it only
    assert window["held"] * 3600 == pytest.approx(60) and window["busy"] * 3600 == pytest.approx(20 + 5 + 10)


def test_gpus_are_billed_where_the_cluster_has_them():
    rows = [span("setup", 0, 10, who="driver", node="h"),
            span("node", 0, 0, who="g", node="g", resources={"CPU": 8, "GPU": 2}),
            span("node", 10, 10, who="g", node="g", resources={"CPU": 8, "GPU": 2}),
            span("chunk", 0, 5, who="a", node="g", resources={"CPU": 1, "GPU": 1})]
    u = usage(rows)
    assert u["resource"] == "GPU" and u["held"] * 3600 == pytest.approx(20) and u["busy"] * 3600 == pytest.approx(5)
    assert "GPU-h held" in usage_table(rows)


def check_timeline(run, wall_s: float, stages: int, worker_prefix: str):
    """The driver's phases (of the run's first sitting) follow one another (none counted twice) and cover the run's
    wall time within 5 %; every
    stage has its chunks, its fit and its test, done by `worker_prefix` processes; report.md shows it all."""
    rows = read_timeline(run)
    driver = sorted((r for r in rows if r["who"] == "driver"), key=lambda r: r["start"])
    sittings = [i for i, r in enumerate(driver) if r["phase"] == "setup"]
    driver = driver[:sittings[1]] if len(sittings) > 1 else driver  # the first sitting (a resumed run adds its own)
    assert [r["phase"] for r in driver] == ["setup"] + ["sample", "train"] * stages + ["report"]
    for a, b in zip(driver, driver[1:]):
        assert b["start"] >= a["end"] - 1e-3, (a, b)  # no overlap
    covered = sum(r["end"] - r["start"] for r in driver)
    assert covered == pytest.approx(wall_s, rel=0.05)
    for stage in range(stages):
        phases = {r["phase"] for r in rows if r["stage"] == stage and r["who"].startswith(worker_prefix)}
        assert {"chunk", "fit", "test"} <= phases, (stage, phases)
    assert all(r["end"] >= r["start"] for r in rows)
    u = usage(rows)
    assert 0 < u["busy"] <= u["held"]
    assert {r["phase"] for r in rows} >= set(BUSY) | {"node", "report"}
    report = (run / "report.md").read_text()
    assert "## Where the time went" in report and (run / "report" / "timeline.png").exists()
    return u


def test_a_run_in_this_process_has_its_timeline(tiny_run):
    cfg, out, manifest, _ = tiny_run
    rows = read_timeline(out)
    driver = [r for r in rows if r["who"] == "driver"]
    # the first sitting (tests that resume this run add theirs): from its set-up to its closing report
    wall = (min(r["end"] for r in driver if r["phase"] == "report")
            - min(r["start"] for r in driver if r["phase"] == "setup"))
    u = check_timeline(Location(str(out)), wall, len(manifest["stages"]), "in-process")
    assert u["resource"] == "CPU" and 0 < u["held"] * 3600  # one slot while the driver runs
