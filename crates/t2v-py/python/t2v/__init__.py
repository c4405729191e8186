"""t2v: the ModelScope text-to-video model natively in Rust, from Python with diffusers' API.

Scripts written for diffusers run by changing the imports::

    import t2v
    from t2v import TextToVideoSDPipeline, DPMSolverMultistepScheduler
    from t2v.utils import export_to_video

    pipe = TextToVideoSDPipeline.from_pretrained("damo-vilab/text-to-video-ms-1.7b", torch_dtype=t2v.float32)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    frames = pipe("Spiderman is surfing", num_inference_steps=25,
                  generator=t2v.Generator("cpu").manual_seed(0)).frames[0]
    print(export_to_video(frames))

Video-to-video (zeroscope's upscaling recipe) is ``VideoToVideoSDPipeline``::

    from t2v import VideoToVideoSDPipeline
    from t2v.utils import load_video

    v2v = VideoToVideoSDPipeline.from_pipe(pipe)  # the same weights, already loaded
    frames = v2v("Spiderman is surfing", video=load_video("spiderman.mp4"), strength=0.6).frames[0]

No torch is needed; when torch is installed, its dtypes and ``torch.Generator`` are accepted.
"""

from ._t2v import __version__
from .generator import Generator
from .pipelines import (
    DiffusionPipeline,
    TextToVideoMSPipeline,
    TextToVideoSDPipeline,
    TextToVideoSDPipelineOutput,
    VideoToVideoSDPipeline,
)
from .schedulers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    FrozenDict,
    LCMScheduler,
    SchedulerMixin,
    UniPCMultistepScheduler,
)
from .utils import export_to_gif, export_to_video, load_video

# Names of the compute dtypes, for `torch_dtype=t2v.float16` where a script said `torch.float16`.
float32 = "float32"
float16 = "float16"
bfloat16 = "bfloat16"

__all__ = [
    "DDIMScheduler",
    "DPMSolverMultistepScheduler",
    "DiffusionPipeline",
    "EulerAncestralDiscreteScheduler",
    "EulerDiscreteScheduler",
    "FrozenDict",
    "Generator",
    "LCMScheduler",
    "SchedulerMixin",
    "TextToVideoMSPipeline",
    "TextToVideoSDPipeline",
    "TextToVideoSDPipelineOutput",
    "UniPCMultistepScheduler",
    "VideoToVideoSDPipeline",
    "__version__",
    "bfloat16",
    "export_to_gif",
    "export_to_video",
    "float16",
    "float32",
    "load_video",
]
