"""Features: backbones, embedding pixels, extraction into the zarr feature store, the store seen as labelled bags."""
