"""minidalle: CLIP → diffusion prior → LoRA-UNet text-to-image, with LoRA fine-tuning."""

import transformers as _transformers

# diffusers' import touches transformers' image processors, which warn once that torchvision (not needed here) is
# missing; keep that out of every CLI run and log, then restore the user's verbosity
_verbosity = _transformers.logging.get_verbosity()
_transformers.logging.set_verbosity_error()
try:
    from diffusers import StableDiffusionPipeline as _sd  # noqa: F401  (the import that warns)
finally:
    _transformers.logging.set_verbosity(_verbosity)

from minidalle.embedded import default_model  # noqa: E402
from minidalle.errors import Cancelled  # noqa: E402
from minidalle.pipeline import GenerationOutput, MiniDallePipeline  # noqa: E402
from minidalle.prior import Prior  # noqa: E402

__version__ = "0.1.0"
DEFAULT_MODEL = default_model()

__all__ = ["Cancelled", "DEFAULT_MODEL", "GenerationOutput", "MiniDallePipeline", "Prior", "__version__",
           "default_model"]
