"""Datasets sdfast generates itself: the procedural shapes set behind the built-in model.

Names load lazily from `sdfast.data.shapes`, so `python -m sdfast.data.shapes` runs the module
once (as __main__) rather than also importing it through the package.
"""
_SHAPES_NAMES = ("COLORS", "PALETTE", "POSITIONS", "SHAPES", "SIZES", "ShapeSpec", "all_specs",
                 "caption", "caption_parts", "draw", "heldout_specs", "is_held_out", "placement",
                 "render", "sample_spec", "train_specs", "write_dataset")
__all__ = list(_SHAPES_NAMES)


def __getattr__(name):
    if name in _SHAPES_NAMES:
        from . import shapes
        return getattr(shapes, name)
    raise AttributeError(f"module 'sdfast.data' has no attribute {name!r}")
