"""Input and output: sinks that receive the blocks of a chunked computation, streamed runs.

:func:`compute_to` streams a Jacobian, Hessian, Hessian diagonal or Laplacian into a file
(``.npy``, ``.zarr``, ``.safetensors``) or any :class:`Sink` block by block, resumably,
and split over the processes of ``torchrun``.
"""

# in-memory sinks of the engine
# streamed runs
from .files import NpySink as NpySink
from .files import SafetensorsSink as SafetensorsSink
from .files import ZarrSink as ZarrSink
from .run import compute_to as compute_to
from .schedule import Block as Block
from .schedule import Layout as Layout
from .schedule import hessian_rows as hessian_rows
from .sinks import CallbackSink as CallbackSink
from .sinks import ItemSink as ItemSink
from .sinks import MemorySink as MemorySink
from .sinks import Sink as Sink
from .sinks import TensorSink as TensorSink

__all__ = [
    "Block",
    "CallbackSink",
    "ItemSink",
    "Layout",
    "MemorySink",
    "NpySink",
    "SafetensorsSink",
    "Sink",
    "TensorSink",
    "ZarrSink",
    "compute_to",
    "hessian_rows",
]
