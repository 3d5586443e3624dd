"""palionnx: PaliGemma image captioning through ONNX Runtime, without PyTorch."""

__version__ = "0.1.0"

from .runtime.captioner import Captioner, CaptionResult  # noqa: E402

__all__ = ["Captioner", "CaptionResult", "__version__"]
