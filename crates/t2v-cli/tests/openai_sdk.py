"""Drives `t2v serve` with the official OpenAI Python SDK: only the base URL and the key change.

Run by tests/serve.rs (`openai_python_sdk`) as: python openai_sdk.py BASE_URL API_KEY OUT_DIR.
Prints one JSON line with what it saw.
"""

import json
import sys

import openai
from openai import OpenAI

base_url, api_key, out_dir = sys.argv[1], sys.argv[2], sys.argv[3]
client = OpenAI(base_url=f"{base_url}/v1", api_key=api_key, max_retries=0, timeout=120)

# t2v's own fields travel in extra_body (the SDK sends multipart/form-data: every field a string).
video = client.videos.create_and_poll(
    prompt="a corgi surfing a wave",
    seconds="1",
    size="32x32",
    extra_body={"num_inference_steps": 2, "seed": 7},
)
assert video.status == "completed", video
assert video.progress == 100, video
settings = video.model_extra["settings"]
assert (settings["seed"], settings["steps"], settings["num_frames"]) == (7, 2, 8), settings

mp4 = client.videos.download_content(video.id, variant="video")
mp4.write_to_file(f"{out_dir}/sdk.mp4")
assert mp4.content[4:8] == b"ftyp"
thumbnail = client.videos.download_content(video.id, variant="thumbnail").content
assert thumbnail.startswith(b"\x89PNG")

page = client.videos.list(limit=10)
assert [v.id for v in page.data] == [video.id]
assert client.videos.retrieve(video.id).id == video.id

errors = {}
try:
    client.videos.create(prompt="x", size="32 by 32")
except openai.BadRequestError as e:
    errors["bad_size"] = (e.status_code, e.param)
try:
    OpenAI(base_url=f"{base_url}/v1", api_key="wrong", max_retries=0).videos.list()
except openai.AuthenticationError as e:
    errors["wrong_key"] = e.status_code
try:
    client.videos.retrieve("video_" + "0" * 32)
except openai.NotFoundError as e:
    errors["unknown"] = e.status_code
assert errors == {"bad_size": (400, "size"), "wrong_key": 401, "unknown": 404}, errors

deleted = client.videos.delete(video.id)
assert deleted.deleted and deleted.id == video.id, deleted

print(json.dumps({"id": video.id, "status": video.status, "seconds": video.seconds, "size": video.size,
                  "mp4_bytes": len(mp4.content), "errors": errors, "openai": openai.__version__}))
