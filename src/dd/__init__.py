"""Distilled Decoding (DD1) reproduction suite.

The torchvision import shim (`shim_torchvision`): the CPU build of torch 2.13.0 sits next to a torchvision
0.28.0 wheel whose compiled ops do not load ("operator torchvision::nms does not exist"). clean-fid,
torch-fidelity, lpips and transformers import torchvision at module level, so the code that imports them calls
`shim_torchvision()` first (dd.evaluate, dd.losses, dd.text_encoder, dd.toy_captions, dd.clip_score, the tests'
conftest). It is not run on `import dd`: torchvision takes 1-2 s to import, and most stages (teacher, pairs,
distill, sample) never need it. See ../shared/reference/ecosystem.md section 1.
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


def shim_torchvision() -> None:
    """Call before importing a library that imports torchvision; nothing to do when torchvision is not installed
    (transformers works without it; clean-fid and lpips then fail on their own import with a clear message)."""
    try:
        import_torchvision()
    except ImportError:
        pass
