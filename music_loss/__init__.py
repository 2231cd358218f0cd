"""MUSIC (Multi-Segmental Informational Coding) self-supervised loss for PyTorch.

>>> from music_loss import MUSICLoss
>>> loss_fn = MUSICLoss(segment_dim=80)
"""

from music_loss._config import MUSICTerms
from music_loss._version import __version__
from music_loss.functional import music_loss, segment_softmax
from music_loss.modules import MUSICLoss, SegmentSoftmax

__all__ = [
    "MUSICLoss",
    "MUSICTerms",
    "SegmentSoftmax",
    "__version__",
    "music_loss",
    "segment_softmax",
]
