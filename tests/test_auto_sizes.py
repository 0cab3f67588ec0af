"""`auto` ray keys (actors, train_workers, num_gpus_per_actor, train_use_gpu): sized from the GPUs of a real
multi-node Ray (ray.cluster_utils, logical GPUs)."""
import pytest
import ray
from ray.cluster_utils import Cluster

from lgd_ray.config import ConfigError, load_config

pytestmark = pytest.mark.slow  # a simulated cluster of growing size


def test_auto_sizes_follow_the_cluster_gpus(tiny_overrides):
    """`ray.actors: auto` and `ray.train_workers: auto` on a cluster of 1, 2 and 4 logical GPUs: as many actors and
    Train workers; fractional train GPUs with several workers refused; CPU actors and workers keep 2 and 1."""
    from lgd_ray.resources import resolve_auto

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 1})
    try:
        ray.init(address=c.address, log_to_driver=False)
        gpu = ["ray.actors=auto", "ray.train_workers=auto", "ray.num_gpus_per_actor=1", "ray.train_use_gpu=true",
               "ray.train_gpus_per_worker=1"]
        cfg = load_config("digits", tiny_overrides + gpu)
        assert (cfg.ray.actors, cfg.ray.train_workers) == (None, None)  # "auto" until sized
        for extra in (0, 1, 2):  # 1, then 2, then 4 GPUs
            if extra:
                c.add_node(num_cpus=1, num_gpus=extra)
                c.wait_for_nodes()
            gpus = 1 + (extra and (1 if extra == 1 else 3))
            sized = resolve_auto(cfg)
            assert (sized.ray.actors, sized.ray.train_workers) == (gpus, gpus)
            if gpus == 1:  # fashion-mnist's defaults on one GPU: both actors on it, the Train worker a whole one
                r = resolve_auto(load_config("fashion-mnist")).ray
                assert (r.actors, r.num_gpus_per_actor, r.train_use_gpu, r.train_gpus_per_worker) == (2, 0.5, True, 1)
        half = resolve_auto(load_config("digits", tiny_overrides + gpu + ["ray.num_gpus_per_actor=0.5"]))
        assert half.ray.actors == 8
        with pytest.raises(ConfigError, match="ray.train_gpus_per_worker' is 0.5 with 8"):
            resolve_auto(load_config("digits", tiny_overrides + gpu + ["ray.train_gpus_per_worker=0.5"]))
        cpu = resolve_auto(load_config("digits", tiny_overrides + ["ray.actors=auto", "ray.train_workers=auto",
                                                                   "ray.num_gpus_per_actor=0", "ray.train_use_gpu=false"]))
        assert (cpu.ray.actors, cpu.ray.train_workers) == (2, 1)
        # the CPU configs' own `auto` GPU keys: 2 actors sharing what there is, at most a GPU each; none without GPUs
        for extra_type, gpus, share in (("", 4, 1.0), ("ray.accelerator_type=A100", 0, 0.0)):
            small = resolve_auto(load_config("digits", tiny_overrides + ([extra_type] if extra_type else [])))
            r = small.ray
            assert (r.actors, r.num_gpus_per_actor, r.train_use_gpu, r.train_workers) == (2, share, gpus > 0, 1)
    finally:
        ray.shutdown()
        c.shutdown()
