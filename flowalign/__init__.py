"""flowalign: align text-to-image flow-matching models with rewards.

Importing the package stays light: model libraries (diffusers, transformers, open_clip) are
imported inside the functions that need them.
"""

__version__ = "0.1.0"
