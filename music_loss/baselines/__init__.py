"""Barlow Twins and VICReg at ``O(N D)`` extra memory: the peers of MUSIC, engineered alike.

The official implementations materialise ``D x D`` matrices (the cross-correlation, the two
covariances) several times during forward+backward: at ``D = 8192`` that is over 1 GiB beyond
the inputs, and out of memory at the wide projectors these methods favour. Here each matrix is
built a block of rows at a time; each block gives its share of the loss and of the gradient
products, and the gradients are finished in the forward pass, as MUSIC's ``torch`` backend
does. Values and gradients are those of the plain formulas
(:func:`barlow_twins_reference`, :func:`vicreg_reference`).

Example:
    >>> import torch
    >>> from music_loss.baselines import BarlowTwinsLoss, barlow_twins_reference
    >>> z1, z2 = torch.randn(64, 96, dtype=torch.float64), torch.randn(64, 96, dtype=torch.float64)
    >>> light = BarlowTwinsLoss()(z1, z2)
    >>> bool(torch.isclose(light, barlow_twins_reference(z1, z2), rtol=1e-12))
    True
"""

from music_loss.baselines.barlow_twins import BarlowTwinsLoss, barlow_twins_loss
from music_loss.baselines.reference import barlow_twins_reference, vicreg_reference
from music_loss.baselines.vicreg import VICRegLoss, vicreg_loss

__all__ = [
    "BarlowTwinsLoss",
    "VICRegLoss",
    "barlow_twins_loss",
    "barlow_twins_reference",
    "vicreg_loss",
    "vicreg_reference",
]
