"""Features: backbones, embedding pixels, extraction into the zarr feature store (its attributes as typed records), the store seen as labelled bags."""
