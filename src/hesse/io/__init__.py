"""Input and output: sinks that receive the blocks of a chunked computation."""

from .sinks import Sink as Sink
from .sinks import TensorSink as TensorSink
