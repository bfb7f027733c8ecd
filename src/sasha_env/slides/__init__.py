"""Slides: reading them, tissue and the patch grid, patch pixels, the cohort manifest, tumour masks, the synthetic cohort."""
