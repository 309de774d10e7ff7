"""The hypernetwork: trunk (task + layer + module embeddings, MLP) and output heads."""

from t2l_framework.hypernet.heads import ChunkedHead, HypernetHead, PerLayerHead, SharedHead
from t2l_framework.hypernet.hypernetwork import HyperNetwork, build_head
from t2l_framework.hypernet.trunk import Trunk

__all__ = ["HyperNetwork", "HypernetHead", "PerLayerHead", "SharedHead", "ChunkedHead", "Trunk", "build_head"]
