"""ddpdiff: text-conditioned image diffusion on CelebA, trained with DDP across GPU nodes."""

__version__ = "0.1.0"
