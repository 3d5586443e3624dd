"""Continuous batching: every caption equals the image captioned alone, however the slots are shared."""

import numpy as np
import pytest
from PIL import Image

from palionnx import Captioner
from palionnx.runtime.generate import make_logits_processors, make_sampler
from palionnx.runtime.preprocess import Pixels, image_pixels
from palionnx.runtime.request import Request
from palionnx.runtime.scheduler import Scheduler
from palionnx.runtime.stream import CaptionStream, Retry
from palionnx.samples import sample_images

PROMPTS = ["caption en", "describe this picture in great detail", "x", "caption en"]


def _requests(captioner, count, lengths, processors=False, seeds=None):
    images = sample_images(count, size=48)
    requests = []
    for i, image in enumerate(images):
        requests.append(Request(
            image_pixels(image, captioner.image_spec), prompt=PROMPTS[i % 4], max_new_tokens=lengths[i % len(lengths)],
            logits_processors=make_logits_processors(1.15, 2) if processors and i % 2 else [],
            sampler=make_sampler(0.8, top_k=20, seed=seeds[i]) if seeds else make_sampler(0.0), tag=i,
        ))
    return images, requests


def _alone(captioner, image, request, seed=None):
    sampler = make_sampler(0.8, top_k=20, seed=seed) if seed is not None else None
    return captioner.caption([image], prompt=request.prompt, max_new_tokens=request.max_new_tokens,
                             logits_processors=list(request.logits_processors), sampler=sampler)[0].tokens


@pytest.mark.parametrize("level", ["fp32", "int8", "int4"])
@pytest.mark.parametrize("family", ["tiny-pg1", "tiny-pg2"])
def test_slots_give_each_image_its_caption_alone(family, level, numpy_folder):
    captioner = Captioner.load(numpy_folder(family, level), device="cpu")
    images, requests = _requests(captioner, 9, [30, 5, 18, 2, 24], processors=True)
    # eos ids that end the greedy captions at very different lengths
    free = [_alone(captioner, image, r) for image, r in zip(images, requests)]
    captioner.manifest.eos_token_ids = [free[0][3], free[2][11], free[4][1]]
    expected = [_alone(captioner, image, r) for image, r in zip(images, requests)]
    assert len({len(e) for e in expected}) >= 4, [len(e) for e in expected]

    scheduler = Scheduler(captioner.model, captioner.text, slots=3, max_len=96)
    got = {c.request.tag: c.tokens for c in scheduler.run(iter(requests))}
    assert [got[i] for i in range(len(requests))] == expected
    assert 0.5 < scheduler.occupancy.ratio(3) <= 1.0 and scheduler.busy == 0


def test_seeded_sampling_does_not_depend_on_the_neighbours(numpy_folder):
    captioner = Captioner.load(numpy_folder("tiny-pg1"), device="cpu")
    seeds = list(range(10, 16))
    images, requests = _requests(captioner, 6, [12, 7], seeds=seeds)
    scheduler = Scheduler(captioner.model, captioner.text, slots=4, max_len=96)
    got = {c.request.tag: c.tokens for c in scheduler.run(requests)}
    assert [got[i] for i in range(6)] == [_alone(captioner, im, r, s) for im, r, s in zip(images, requests, seeds)]


def test_slots_stay_full_while_captions_vary(numpy_folder):
    """With many more images than slots, a slot is refilled the step after its caption ends."""
    captioner = Captioner.load(numpy_folder("tiny-pg1"), device="cpu")
    _, requests = _requests(captioner, 64, [3, 20, 9, 14, 6, 30])
    for request in requests:
        request.ignore_eos = True  # lengths exactly as asked: 3 to 30 tokens
    scheduler = Scheduler(captioner.model, captioner.text, slots=4, max_len=96)
    completions = list(scheduler.run(requests))
    assert sorted(c.request.tag for c in completions) == list(range(64))
    lengths = [len(c.tokens) for c in sorted(completions, key=lambda c: c.request.tag)]
    assert lengths == [r.max_new_tokens for r in requests]
    assert scheduler.occupancy.ratio(4) >= 0.9


def test_request_too_long_for_a_slot_is_refused(numpy_folder):
    captioner = Captioner.load(numpy_folder("tiny-pg1"), device="cpu")
    _, (request,) = _requests(captioner, 1, [60])
    with pytest.raises(ValueError, match="exceed a slot"):
        Scheduler(captioner.model, captioner.text, slots=2, max_len=40).submit(request)
    assert np.all(Scheduler(captioner.model, captioner.text, slots=2, max_len=80).state.lengths == 0)


def test_short_captions_are_captioned_again_and_the_longest_kept(numpy_folder):
    """CaptionStream with a Retry resubmits a short caption's pixels as a new request, at most `retries` more
    times, and gives back the caption with the most words with the attempts counted."""
    captioner = Captioner.load(numpy_folder("tiny-pg1"), device="cpu")
    images = [Pixels(image_pixels(image, captioner.image_spec), f"image{i}")
              for i, image in enumerate(sample_images(5, size=48))]
    lengths = {}  # words of every caption generated, per image

    def words(text: str) -> int:
        return len(text.split())

    class Counting(Retry):
        def better(self, best, latest):
            lengths.setdefault(latest.source, [words(best.text)]).append(words(latest.text))
            return super().better(best, latest)

    stream = CaptionStream(captioner, [(i, image) for i, image in enumerate(images)], slots=2, max_new_tokens=12,
                           sampler=make_sampler(0.9, seed=0), retry=Counting(min_words=1000, retries=3))
    results = dict(stream)
    assert sorted(results) == list(range(5))
    for result in results.values():
        assert result.ok and result.attempts == 4
        assert words(result.text) == max(lengths[result.source]) and len(lengths[result.source]) == 4

    never = CaptionStream(captioner, [(0, images[0])], max_new_tokens=12, sampler=make_sampler(0.9, seed=0),
                          retry=Retry(min_words=1, retries=3))
    assert [result.attempts for _, result in never] == [1]  # long enough at once: captioned once


def test_engine_frees_the_slot_of_a_request_its_caller_gave_up(numpy_folder):
    """The server's engine drops a cancelled request (an HTTP timeout) at its next step: with one slot, a
    long caption whose caller gave up does not hold back the next request."""
    import time

    from palionnx.server.engine import Engine
    from palionnx.server.metrics import Metrics

    captioner = Captioner.load(numpy_folder("tiny-pg1"), device="cpu")
    engine = Engine(captioner, slots=1, max_len=4096, max_queue=4, metrics=Metrics())
    engine.start()
    try:
        pixels = image_pixels(sample_images(1)[0], captioner.image_spec)
        long = engine.submit(Request(pixels, max_new_tokens=3000, ignore_eos=True))
        deadline = time.monotonic() + 30
        while not engine.scheduler.busy and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.scheduler.busy == 1 and long.cancel()
        short = engine.submit(Request(pixels, max_new_tokens=4, ignore_eos=True))
        assert len(short.result(timeout=60).tokens) == 4
        assert engine.scheduler.occupancy.steps < 1500  # the long caption's 3000 steps were not run
    finally:
        engine.stop()


class _CaptureFails:
    """A decoder session whose captured runs (a CUDA graph id of 0 or more) fail, as a capture that is not
    possible on some device does; everything else goes to the real session."""

    def __init__(self, session):
        self.session, self.failures = session, 0

    def run_with_iobinding(self, binding, options=None):
        if options is not None and int(options.get_run_config_entry("gpu_graph_id")) >= 0:
            self.failures += 1
            raise RuntimeError("CUDA graph capture failed")
        return self.session.run_with_iobinding(binding, options)

    def __getattr__(self, name):
        return getattr(self.session, name)


def test_a_failed_capture_falls_back_inside_the_state(numpy_folder, monkeypatch):
    """A state whose CUDA-graph capture fails runs its steps on an uncaptured decoder from then on, with the
    same tokens; the model and other states keep capturing (played on the CPU with a decoder that fails
    captured runs: the CPU ignores graph ids)."""
    plain = Captioner.load(numpy_folder("tiny-pg1"), device="cpu")
    images = [Image.new("RGB", (40, 40), colour) for colour in ("red", "blue")]
    expected = [r.tokens for r in plain.caption(images, max_new_tokens=6)]

    captioner = Captioner.load(numpy_folder("tiny-pg1"), device="cpu")
    model = captioner.model
    failing = _CaptureFails(model.decoder)
    monkeypatch.setattr(model, "cuda_graph", True)
    monkeypatch.setattr(model, "decoder", failing)
    monkeypatch.setattr(model, "prefill_decoder", failing)
    opened = []
    real_open = model._open
    monkeypatch.setattr(model, "_open", lambda role, capture: opened.append((role, capture)) or real_open(role, False))
    first, second = model.new_state(2, 32), model.new_state(2, 32)
    assert first.captured and second.captured
    assert [r.tokens for r in captioner.caption(images, max_new_tokens=6)] == expected
    state = model.new_state(2, 32)
    prompt = captioner.prompt_batch(np.stack([captioner.load_pixels(image) for image in images]), ["caption en"] * 2)
    state.prefill(prompt)  # prefill is never captured: the failing decoder runs it
    state.step(np.array([5, 6]))
    assert not state.captured and first.captured and model.cuda_graph and failing.failures >= 2
    assert opened == [("decoder", False)]  # one uncaptured decoder, opened once and shared


@pytest.mark.parametrize("family", ["tiny-pg1", "tiny-pg2"])
def test_overlapped_admission_gives_each_image_its_caption_alone(family, numpy_folder):
    """Newcomers prefilled on a thread beside the decode steps, their cache rows copied in: the same greedy
    tokens as captioning each image alone, with processors and captions ending at different lengths."""
    captioner = Captioner.load(numpy_folder(family), device="cpu")
    images, requests = _requests(captioner, 7, [30, 5, 18, 2, 24], processors=True)
    free = [_alone(captioner, image, r) for image, r in zip(images, requests)]
    captioner.manifest.eos_token_ids = [free[0][3], free[2][11]]
    expected = [_alone(captioner, image, r) for image, r in zip(images, requests)]
    scheduler = Scheduler(captioner.model, captioner.text, slots=3, max_len=96, overlap=True)
    got = {c.request.tag: c.tokens for c in scheduler.run(iter(requests))}
    assert [got[i] for i in range(len(requests))] == expected
    assert scheduler.busy == 0 and scheduler.queued == 0 and scheduler.prefiller.idle


def test_a_request_dropped_while_prefilled_beside_the_steps_never_runs(numpy_folder):
    captioner = Captioner.load(numpy_folder("tiny-pg1"), device="cpu")
    images, requests = _requests(captioner, 2, [40])
    scheduler = Scheduler(captioner.model, captioner.text, slots=2, max_len=96, overlap=True)
    for request in requests:
        scheduler.submit(request)
    scheduler.step()  # the first one goes to the prefiller
    assert scheduler.queued == 2 and scheduler.drop(lambda r: r.tag == 0) == 1
    completions = []
    while scheduler.busy or scheduler.queued:
        completions += scheduler.step()
    assert [c.request.tag for c in completions] == [1]
