"""The structured engine: per-layer rules on a captured graph of the model."""

from .capture import CaptureError as CaptureError
from .capture import capture as capture
from .compute import structured_pass as structured_pass
from .cost import GraphCost as GraphCost
from .cost import graph_cost as graph_cost
from .rules import register_rule as register_rule
