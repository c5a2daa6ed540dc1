"""lfm: fast, faithful detection of AI-generated images with the Local Focus Mechanism."""
from .model import LFM, min_input_size, snet_output_size

__all__ = ["LFM", "min_input_size", "snet_output_size"]
