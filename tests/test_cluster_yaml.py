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
        assert set(cfg.generator.pool.resources) <= set(types["gpu_generation"]["resources"]), name
        assert set(cfg.train.resources) <= set(types["gpu_training"]["resources"]), name
    hybrid = load_config("configs/hybrid.yaml")
    assert hybrid.generator.backend == "hybrid" and hybrid.generator.hybrid.expander == "vec2face"
    # HybridGen's expansion: sigma 0.2 per dimension at the raw feature's own norm, after the InstantID re-render
    assert hybrid.generator.hybrid.expansion.preset == "hybridgen" and hybrid.generator.hybrid.rerender.enabled
    # one generation actor (hybrid backend + faces stage) per generation GPU
    assert hybrid.generator.pool.num_gpus <= types["gpu_generation"]["resources"]["GPU"]


def test_cluster_yaml_keeps_the_dashboard_local_uploads_no_venv_and_names_one_image():
    import fnmatch

    text = open("cluster.yaml").read()
    config = yaml.safe_load(text)
    [head_start] = [c for c in config["head_start_ray_commands"] if c.startswith("ray start")]
    assert "--dashboard-host=127.0.0.1" in head_start and "0.0.0.0" not in head_start
    excluded = config["rsync_exclude"]
    for path in (".venv", ".venv/lib/python3.11/site.py", "outputs/", "outputs/local/raw/block-000000.parquet"):
        assert any(fnmatch.fnmatch(path, pattern) for pattern in excluded), path
    images = {t["node_config"]["ImageId"] for t in config["available_node_types"].values()}
    assert images == {"ami-SET-THIS"}  # one setting, referenced by every node type
    assert text.count("ami-SET-THIS") == 1
