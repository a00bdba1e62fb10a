"""Import diffusers' pipelines once with transformers' logging at error level.

That first import touches transformers' image processors, which print a notice that torchvision (not needed here) is
missing; keep it out of every CLI run and log. The user's verbosity is restored afterwards.
"""

import transformers

_verbosity = transformers.logging.get_verbosity()
transformers.logging.set_verbosity_error()
try:
    from diffusers import StableDiffusionPipeline  # noqa: F401  (the import that prints the notice)
finally:
    transformers.logging.set_verbosity(_verbosity)
