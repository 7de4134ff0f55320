"""The registry of strategies; importing this package registers the built-in ones."""

from . import functorch as functorch
from . import loop as loop
from . import structured as structured
from .base import Capabilities as Capabilities
from .base import ProductStrategy as ProductStrategy
from .base import Strategy as Strategy
from .base import available_strategies as available_strategies
from .base import get_strategy as get_strategy
from .base import register_strategy as register_strategy
