"""Per-example gradients with augmentation folding: the engine and one rule file per layer type."""

from privfast.grad_sample.base import RULES, ContractionGrads, LayerGrads, MaterializedGrads, register_rule
from privfast.grad_sample.engine import MODES, GradSampleModule

__all__ = ["MODES", "RULES", "ContractionGrads", "GradSampleModule", "LayerGrads", "MaterializedGrads", "register_rule"]
