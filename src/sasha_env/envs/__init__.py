"""Environments: ``Sasha-WSI-v0`` over a slide's feature state, the slide arrays and models it reads, rendering."""
