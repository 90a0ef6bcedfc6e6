"""vimpac: video pre-training by masked token prediction and contrastive learning over VQ video tokens."""

__version__ = "0.1.0"
