"""palionnx: PaliGemma image captioning through ONNX Runtime, without PyTorch."""

from .version import __version__

# onnxruntime comes from an extra, in one of two flavours (they install the same module): say which.
NO_ONNXRUNTIME = ("palionnx needs onnxruntime: pip install 'palionnx[cpu]', or 'palionnx[gpu]' for NVIDIA CUDA "
                  "(README, Install)")


def _interrupted(error: BaseException | None) -> bool:
    """Whether Ctrl-C caused this error (numpy, for one, turns it into an ImportError while importing)."""
    while error is not None:
        if isinstance(error, KeyboardInterrupt):
            return True
        error = error.__cause__ or error.__context__
    return False


try:
    import onnxruntime  # noqa: F401
except ImportError as exc:
    if _interrupted(exc):
        raise KeyboardInterrupt from None
    missing = isinstance(exc, ModuleNotFoundError) and exc.name == "onnxruntime"
    first_line = (str(exc).strip() or repr(exc)).splitlines()[0]
    raise ImportError(NO_ONNXRUNTIME + ("" if missing else f" (importing it failed: {first_line})"),
                      name="onnxruntime") from None

from .jobs.cleanup import clean_caption  # noqa: E402
from .runtime.captioner import Captioner, CaptionResult  # noqa: E402

__all__ = ["NO_ONNXRUNTIME", "Captioner", "CaptionResult", "__version__", "clean_caption"]
