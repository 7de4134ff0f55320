"""The structured engine: per-layer rules on a captured graph of the model."""

from .cost import GraphCost as GraphCost
from .cost import graph_cost as graph_cost
from .graph import CaptureError as CaptureError
from .graph import Graph as Graph
from .graph import build_graph as build_graph
from .modes import directional_pass as directional_pass
from .modes import structured_pass as structured_pass
from .rules import register_rule as register_rule
