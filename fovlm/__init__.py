"""fovlm: foveated video vision-language models trained with PyTorch Lightning.

DINOv2 encodes each frame once; a learned query travels through every DINO layer and reads one
token per frame; SmolLM2 reads those tokens and writes the query for the next frame.
"""

__version__ = "0.1.0"
