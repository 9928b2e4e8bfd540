"""The default W-Net model (trained on BSDS500 train+val images, labels unused)."""
