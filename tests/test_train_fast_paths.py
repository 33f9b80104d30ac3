"""train.compile: torch.compile traces the backbone and the margin head without graph breaks (the
masks of facegen.train.heads and partial_fc instead of row selections keep every shape static)."""

import pytest
import torch

from facegen.models.iresnet import build_backbone
from facegen.train.heads import ArcFace, CombinedMargin, CosFace
from facegen.train.partial_fc import PartialFC


@pytest.mark.parametrize("margin", [ArcFace(), CosFace(), CombinedMargin(m1=1.0, m2=0.3, m3=0.1)], ids=type)
def test_the_margin_head_traces_without_graph_breaks(margin):
    """One graph at sample rate 1.0; below it one break, around the class sampling alone (its size
    depends on the batch)."""
    torch.manual_seed(0)
    embeddings, labels = torch.randn(8, 32, requires_grad=True), torch.randint(0, 500, (8,))
    full = torch._dynamo.explain(PartialFC(margin, 32, 500))(embeddings, labels, 0)
    sampled = torch._dynamo.explain(PartialFC(margin, 32, 500, sample_rate=0.2))(embeddings, labels, 0)
    assert (full.graph_count, full.graph_break_count) == (1, 0)
    assert sampled.graph_break_count == 1 and "sample" in str(sampled.break_reasons[0].user_stack[-1].line)


def test_the_backbone_traces_as_one_graph():
    explained = torch._dynamo.explain(build_backbone("iresnet18", width=8, embedding_size=32).eval())(torch.randn(2, 3, 112, 112))
    assert (explained.graph_count, explained.graph_break_count) == (1, 0)
