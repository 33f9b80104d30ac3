"""Fusion rules as data, and planted-noise precision/recall of the cluster expert alone and of the fusion."""

import numpy as np
import pytest
import torch

from facegen.clean.block import vote_block
from facegen.clean.fusion import fuse, rows_needing
from facegen.clean.independent import IndependentExpert, IndependentSettings, load_embedder
from facegen.clean.votes import ABSTAIN, DROP, KEEP, ExpertVotes
from facegen.clean.vlm import VlmExpert, VlmSettings
from facegen.config import CleanSettings, EmbedderSettings, FusionSettings
from facegen.models.iresnet import iresnet18
from facegen.models.iresnet_checkpoint import save_backbone
from planted import ChatServer, planted_block


def votes(name, values):
    ev = ExpertVotes.abstaining(name, len(values))
    ev.vote[:] = values
    return ev


def test_default_rules_drop_on_agreement_and_defer_disagreement_to_the_vlm():
    settings = FusionSettings()
    cluster = votes("cluster", [KEEP, DROP, KEEP, DROP, DROP])
    independent = votes("independent", [KEEP, DROP, DROP, KEEP, KEEP])
    vlm = votes("vlm", [ABSTAIN, ABSTAIN, DROP, KEEP, ABSTAIN])
    fused = fuse({"cluster": cluster, "independent": independent, "vlm": vlm}, settings, 5)
    assert fused.keep.tolist() == [True, False, False, True, False]  # the last: VLM abstained, cluster decides
    assert fused.rule.tolist() == [1, 0, 2, 2, 3]
    assert fused.decided_by(settings)[0] == "rule 2 (cluster=keep, independent=keep) -> keep"
    need = rows_needing("vlm", {"cluster": cluster, "independent": independent}, settings, 5, {"vlm"})
    assert need.tolist() == [False, False, True, True, True]
    # without the independent expert the cluster expert decides alone
    alone = fuse({"cluster": cluster}, settings, 5)
    assert alone.keep.tolist() == [True, False, True, False, False] and set(alone.rule.tolist()) == {3}


def test_rules_come_from_the_config():
    settings = CleanSettings.model_validate({"experts": [{"kind": "vlm"}],
                                             "fusion": {"rules": [{"when": {"vlm": "drop"}, "then": "drop"}], "default": "keep"}}).fusion
    fused = fuse({"vlm": votes("vlm", [DROP, KEEP, ABSTAIN])}, settings, 3)
    assert fused.keep.tolist() == [False, True, True] and fused.rule.tolist() == [0, -1, -1]
    with pytest.raises(ValueError, match=r"fusion.rules\[0\]: oracle is not a configured expert \(configured: cluster;"):
        CleanSettings.model_validate({"fusion": {"rules": [{"then": "oracle"}]}})
    with pytest.raises(ValueError, match=r"fusion.rules\[1\]: vlm is not a configured expert"):  # a rule for an expert left out
        CleanSettings.model_validate({"fusion": {"rules": [{"then": "cluster"}, {"when": {"vlm": "drop"}, "then": "drop"}]}})


def precision_recall(table):
    ids = np.array(table.column("identity_id").to_pylist())
    wrong = np.array(table.column("true_identity_id").to_pylist()) != ids
    dropped = np.array(table.column("status").to_pylist()) != "ok"
    caught = (wrong & dropped).sum()
    return caught / dropped.sum(), caught / wrong.sum()


@pytest.fixture(scope="module")
def second_model(tmp_path_factory):
    torch.manual_seed(0)  # an untrained IResNet still maps equal patterns close together
    folder = tmp_path_factory.mktemp("independent")
    save_backbone(str(folder), iresnet18(width=8).eval(), "iresnet18", 8, 512)
    return IndependentExpert(load_embedder(EmbedderSettings(path=str(folder))), IndependentSettings(percentile=10))


def test_planted_noise_cluster_alone_and_fusion(second_model, tmp_path):
    table = planted_block(12, 16, 0.15, seed=1)
    settings = CleanSettings()
    alone, _, _ = vote_block(table, 0, settings)
    p_cluster, r_cluster = precision_recall(alone)
    with ChatServer(64) as server:
        vlm = VlmExpert(VlmSettings(base_url=server.base_url, thumbnail=64, requests_per_minute=6000), str(tmp_path / "vlm"))
        fused, _, stats = vote_block(table, 0, settings, [second_model, vlm])
        asked = len(server.requests)
    p_fusion, r_fusion = precision_recall(fused)
    print(f"cluster alone: precision {p_cluster:.3f} recall {r_cluster:.3f}; fusion: precision {p_fusion:.3f} recall {r_fusion:.3f}")
    # The 50-80 % band makes the cluster expert drop at least a fifth of every identity: it finds
    # every planted image, and many good ones with them.
    assert r_cluster == 1.0 and 0.6 <= p_cluster <= 0.9
    assert p_fusion >= 0.95 and r_fusion >= 0.85
    votes_of = {r["sample_idx"]: r["votes"] for r in fused.to_pylist() if r["identity_id"] == 0}
    assert all([v["expert"] for v in vs] == ["cluster", "independent", "vlm"] for vs in votes_of.values())
    # the VLM was asked only about identities where the cluster and independent experts disagreed
    disagree = {r["identity_id"] for r in fused.to_pylist() if r["decided_by"].startswith("rule 3")
                or r["decided_by"].startswith("rule 4")}
    assert stats["experts_asked_identities"]["vlm"] == asked == len(disagree) <= 12
