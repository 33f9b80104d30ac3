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
    cfg = load_config("configs/sd_cluster.yaml")
    assert set(cfg.generator.resources) <= set(types["gpu_generation"]["resources"])
    assert set(cfg.train.resources) <= set(types["gpu_training"]["resources"])
