"""recsys_mtl: TorchRec-native multi-task recommendation."""

__version__ = "0.1.0"
