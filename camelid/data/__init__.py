"""Data: sources, cleaning and filters, dedup, language id, mixture, token shards, loader."""

from camelid.data.loader import PackedLoader, SyntheticLoader
from camelid.data.pipeline import prepare
from camelid.data.recipe import Recipe, SourceConfig, load_recipe
from camelid.data.shards import Manifest

__all__ = ["Manifest", "PackedLoader", "Recipe", "SourceConfig", "SyntheticLoader", "load_recipe", "prepare"]
