"""Distilled Decoding (DD1) reproduction suite.

Importing the package first applies the torchvision import shim: the CPU build of torch 2.13.0 sits
next to a torchvision 0.28.0 wheel whose compiled ops do not load ("operator torchvision::nms does not
exist"). clean-fid and lpips import torchvision at module level, so the shim must run before them.
See ../shared/reference/ecosystem.md section 1.
"""
import sys
import types

__version__ = "0.1.0"


def import_torchvision():
    """Import torchvision, stubbing its meta registrations when the compiled ops are missing.

    On a healthy install (e.g. a CUDA build of torch with the matching torchvision) this is a plain
    import and changes nothing.
    """
    try:
        import torchvision
    except RuntimeError as err:
        if "torchvision::" not in str(err):
            raise
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        sys.modules["torchvision._meta_registrations"] = types.ModuleType("torchvision._meta_registrations")
        import torchvision
    return torchvision


try:
    import_torchvision()
except ImportError:  # torchvision is optional for most of the package
    pass
