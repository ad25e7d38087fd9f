"""SpikeCLIP for the open_clip ecosystem.

Importing this package is cheap: it only installs a post-import hook. The model names appear in
``open_clip``, ``timm`` and ``clip_benchmark`` as soon as those packages are imported (or right away
if they already are). ``register()`` does the same work eagerly.
"""
import logging

from . import _autoregister

__version__ = "0.1.0"

__all__ = ["register", "__version__"]

logging.getLogger(__name__).addHandler(logging.NullHandler())


def register() -> None:
    """Register the spiking towers with timm, the model configs and text-tower seam with open_clip,
    and the ``spikeclip`` model type with clip_benchmark. Safe to call more than once."""
    from .registration import register_all

    register_all()


_autoregister.install()
