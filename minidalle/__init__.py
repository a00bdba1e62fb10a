"""minidalle: CLIP → diffusion prior → LoRA-UNet text-to-image, with LoRA fine-tuning."""

from minidalle.embedded import default_model
from minidalle.errors import Cancelled
from minidalle.pipeline import GenerationOutput, MiniDallePipeline
from minidalle.prior import Prior

__version__ = "0.1.0"
DEFAULT_MODEL = default_model()

__all__ = ["Cancelled", "DEFAULT_MODEL", "GenerationOutput", "MiniDallePipeline", "Prior", "__version__",
           "default_model"]
