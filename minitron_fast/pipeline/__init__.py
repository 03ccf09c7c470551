"""The whole Minitron pipeline from a recipe: teacher correction, importance, optional search,
prune, distill, a from-scratch baseline, evaluation and export, with per-stage artifact caching.

- ``load_recipe(name_or_path, overrides)``: a validated :class:`Recipe` (``recipe.py``).
- ``run_recipe(recipe)``: runs the stages (``runner.py``) and writes ``report.md``/``report.json``.
"""
from __future__ import annotations

from minitron_fast.pipeline.recipe import Recipe, RecipeError, find_recipe, load_recipe, shipped_recipes

__all__ = ["Recipe", "RecipeError", "find_recipe", "load_recipe", "shipped_recipes"]
