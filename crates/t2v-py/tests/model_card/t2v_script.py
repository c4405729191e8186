import t2v
from t2v import TextToVideoMSPipeline, DPMSolverMultistepScheduler
from t2v.utils import export_to_video
pipe = TextToVideoMSPipeline.from_pretrained("fixtures/small-t2v", torch_dtype=t2v.float16)
pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
pipe = pipe.to("cuda")
prompt = "Spiderman is surfing"
video_frames = pipe(prompt).frames
video_path = export_to_video(video_frames)
print(video_path)
