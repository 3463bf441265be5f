"""SemiSAM core: volumes, preprocessing, phantoms, datasets (and later models and training).

This package never imports Slicer, Qt, CTK or VTK; the Slicer modules call into it.
"""

__version__ = "0.1.0"
