"""NanoStream: few-shot image classifiers from transfer learning and data augmentation."""

__version__ = "0.1.0"
