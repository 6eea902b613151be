"""Quantization methods, one module each, registered in trtforge.registry.QUANT_METHODS.

The interface and the dispatcher are in base.py. A new method is one new module here that
subclasses :class:`~trtforge.calibration.methods.base.QuantMethod` and registers an instance,
plus its name in trtforge/registry.py's built-in list (or a ``trtforge.quant_methods`` entry
point for a plugin).
"""
