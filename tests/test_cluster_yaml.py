"""cluster.yaml is a cluster-launcher file that Ray's own validation accepts."""

import yaml


def test_cluster_yaml_passes_ray_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load(open("cluster.yaml"))
    prepared = prepare_config(config)
    validate_config(prepared)
    types = prepared["available_node_types"]
    assert types[prepared["head_node_type"]]["resources"]["CPU"] == 0
    assert any("--num-cpus=0" in c for c in config["head_start_ray_commands"])
    assert types["gpu_generation"]["resources"]["GPU"] >= 1
    assert types["gpu_training"]["resources"]["GPU"] >= 1
    assert any("pip install -e" in c for c in config["setup_commands"])


def test_cluster_config_resources_match_node_types():
    from facegen.config import load_config

    types = yaml.safe_load(open("cluster.yaml"))["available_node_types"]
    for name in ("configs/sd_cluster.yaml", "configs/hybrid.yaml"):
        cfg = load_config(name)
        assert set(cfg.generator.resources) <= set(types["gpu_generation"]["resources"]), name
        assert set(cfg.train.resources) <= set(types["gpu_training"]["resources"]), name
    hybrid = load_config("configs/hybrid.yaml")
    assert hybrid.generator.backend == "hybrid" and hybrid.generator.hybrid.expander == "arc2face"
    # one hybrid actor and one faces actor share each generation GPU
    assert hybrid.generator.num_gpus + hybrid.faces.num_gpus <= types["gpu_generation"]["resources"]["GPU"]
