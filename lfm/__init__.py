"""lfm: fast, faithful detection of AI-generated images with the Local Focus Mechanism."""
from .model import LFM, LFMGAP, min_input_size, snet_output_size
from .npr import NPR

__all__ = ["LFM", "LFMGAP", "NPR", "min_input_size", "snet_output_size"]
