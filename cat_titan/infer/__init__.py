from .generate import Generation, StepOutput, generate, stream
from .runners import make_runner
from .sampling import SamplingParams, sample

__all__ = ["Generation", "SamplingParams", "StepOutput", "generate", "make_runner", "sample", "stream"]
