"""The GIL is released while the model runs; Ctrl-C and the step callback stop a run after the
step in progress."""

import os
import signal
import threading
import time

import numpy as np
import pytest

import t2v
from conftest import pipeline


class Counter(threading.Thread):
    """Counts in pure Python (it needs the GIL to make progress) until stopped."""

    def __init__(self):
        super().__init__(daemon=True)
        self.count = 0
        self.stop = False

    def run(self):
        while not self.stop:
            self.count += 1


def test_other_threads_run_while_the_model_runs():
    pipe = pipeline("small-t2v")
    marks = []  # (time, counter) after each step

    counter = Counter()
    counter.start()
    try:
        pipe("a cat", num_inference_steps=6, num_frames=8,
             callback=lambda step, t, latents: marks.append((time.perf_counter(), counter.count)))
    finally:
        counter.stop = True
        counter.join()
    assert len(marks) == 6
    # Between two step reports the pipeline was in native code the whole time: the counter can
    # only have advanced if the GIL was free then.
    gains = [b[1] - a[1] for a, b in zip(marks, marks[1:])]
    durations = [b[0] - a[0] for a, b in zip(marks, marks[1:])]
    print(f"counter gains between steps: {gains}, step durations {[f'{d:.3f}' for d in durations]}")
    assert min(gains) > 10_000, gains


def test_runs_from_two_threads_share_the_model():
    pipe = pipeline("tiny-t2v")
    results = {}

    def run(seed):
        results[seed] = pipe("a cat", num_inference_steps=2, num_frames=2, generator=seed).frames

    threads = [threading.Thread(target=run, args=(seed,)) for seed in (1, 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    alone = pipe("a cat", num_inference_steps=2, num_frames=2, generator=1).frames
    assert np.array_equal(results[1], alone)
    assert not np.array_equal(results[1], results[2])


def test_ctrl_c_stops_within_one_step(ctrl_c):
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signals reach the main thread only")
    pipe = pipeline("small-t2v")
    steps = []
    sent_after = []
    first_step = threading.Event()

    def interrupt():
        first_step.wait(60)
        time.sleep(0.05)  # into the next step, in native code
        sent_after.append(len(steps))
        os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C sends

    thread = threading.Thread(target=interrupt)
    thread.start()
    with pytest.raises(KeyboardInterrupt):
        pipe("a cat", num_inference_steps=50, num_frames=8,
             callback=lambda step, t, latents: (steps.append(step), first_step.set()))
    thread.join()
    print(f"SIGINT sent after {sent_after[0]} steps; {len(steps)} steps ran")
    # The step in progress when the signal came finishes; no other starts.
    assert len(steps) <= sent_after[0] + 1, (steps, sent_after)
    assert len(steps) < 50
    # The pipeline still works afterwards.
    assert pipe("a cat", num_inference_steps=1, num_frames=2).frames.shape == (1, 2, 64, 64, 3)


def test_callback_interrupt_returns_the_frames_reached():
    pipe = pipeline("tiny-t2v")
    seen = {}

    def on_step_end(p, step, timestep, callback_kwargs):
        assert p is pipe
        seen[step] = (timestep, callback_kwargs["latents"].copy())
        if step == 1:
            p._interrupt = True
        return callback_kwargs

    settings = dict(num_inference_steps=5, num_frames=2, generator=4)
    latents = pipe("a cat", output_type="latent", callback_on_step_end=on_step_end, **settings).frames
    assert sorted(seen) == [0, 1], "the run goes on after the interrupt"
    assert pipe.interrupt
    assert latents.shape == seen[1][1].shape == (1, 4, 2, 32, 32)
    assert np.array_equal(latents, seen[1][1])
    pipe.scheduler.set_timesteps(5)
    assert [seen[i][0] for i in (0, 1)] == list(pipe.scheduler.timesteps[:2])

    seen.clear()
    stopped = pipe("a cat", callback_on_step_end=on_step_end, **settings).frames
    full = pipe("a cat", **settings).frames
    assert not pipe.interrupt, "each call starts uninterrupted"
    assert stopped.shape == full.shape == (1, 2, 32, 32, 3)
    assert np.isfinite(stopped).all() and not np.array_equal(stopped, full)


def test_callback_exceptions_propagate():
    pipe = pipeline("tiny-t2v")

    def fail(p, step, timestep, kwargs):
        raise LookupError(f"stop at {step}")

    with pytest.raises(LookupError, match="stop at 0"):
        pipe("a cat", num_inference_steps=3, num_frames=2, callback_on_step_end=fail)


def test_legacy_callback_every_callback_steps():
    pipe = pipeline("tiny-t2v")
    calls = []
    pipe("a cat", num_inference_steps=5, num_frames=2, callback_steps=2,
         callback=lambda step, t, latents: calls.append((step, int(t), latents.shape)))
    pipe.scheduler.set_timesteps(5)
    assert calls == [(i, int(pipe.scheduler.timesteps[i]), (1, 4, 2, 32, 32)) for i in (0, 2, 4)]
